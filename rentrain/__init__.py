"""rentrain: train Stable Diffusion LoRAs on rented GPUs, unattended."""

__version__ = "0.1.0"
