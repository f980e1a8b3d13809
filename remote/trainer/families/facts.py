"""The plain facts of each model family, without torch: what the client (rentrain, on the laptop) and the
trainer's memory planning need to know about a family before any model is loaded.

The trainer's own side of a family (loading, text encoding, the training target, LoRA names, sampling) is
in its module beside this one (sd.py, sdxl.py); both are looked up by the family's name (``sd15``, ``sd2``,
``sdxl``), the name the events and states carry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyProfile:
    """Measured on an H200 with bf16 and CUDA graphs (bench/RESULTS.md): peak activation memory per sample
    of ``reference_pixels``, and the step time of a micro-batch of m such samples, ``overhead + m * per_sample``."""

    reference_pixels: int
    activation_gib: float
    checkpointed_gib: float
    overhead_ms: float
    per_sample_ms: float
    checkpointing_factor: float


@dataclass(frozen=True)
class Architecture:
    """Parameter counts of the standard architecture (the configs bench/train_speed.py builds): for planning
    before a model is loaded. LoRA parameters are per unit of network_dim on kohya's module set."""

    unet_params: int
    text_encoder_params: int  # all text encoders together
    lora_unet_per_dim: int
    lora_text_encoder_per_dim: int


@dataclass(frozen=True)
class FamilyFacts:
    name: str  # the key: "sd15", "sd2", "sdxl"
    label: str  # for people: "SD 1.x"
    memory: FamilyProfile
    architecture: Architecture | None  # None: not counted (planning then uses the loaded model's own)
    download_gb: float  # the usual single-file checkpoint
    download_source: str
    speed_case: str | None  # bench/train_speed.py's case whose measurements rentrain's speed model uses
    module: str  # the trainer's implementation (needs torch), imported only when a run needs it

    @property
    def checkpointing_factor(self) -> float:
        """Step-time factor of gradient checkpointing (measured, see ``memory``)."""
        return self.memory.checkpointing_factor


# SD 1.5 512px: b4 6.14 GiB / 59.4 ms; b2 4.08-4.25 GiB / 32.6-35.0 ms; b4 checkpointed 3.27 GiB / 94.3 ms
_SD_MEMORY = FamilyProfile(512 * 512, 1.04, 0.28, 5.7, 13.4, 1.59)

FAMILIES: dict[str, FamilyFacts] = {
    "sd15": FamilyFacts(
        name="sd15",
        label="SD 1.x",
        memory=_SD_MEMORY,
        architecture=Architecture(859_520_964, 123_060_480, 423_936, 165_888),
        download_gb=2.1,
        download_source="runwayml v1-5-pruned-emaonly fp16 safetensors, ~2.1 GB",
        speed_case="sd15",
        module="remote.trainer.families.sd",
    ),
    # SD 2.x: SD 1.5's UNet layout with an OpenCLIP-H text encoder; its activations are planned as SD 1.5's
    # scaled by pixels (768px runs cost 2.25x of 512px). Neither measured nor counted on its own.
    "sd2": FamilyFacts(
        name="sd2",
        label="SD 2.x",
        memory=_SD_MEMORY,
        architecture=None,
        download_gb=5.2,
        download_source="stabilityai stable-diffusion-2-1 v2-1_768-ema-pruned.safetensors, 5.21 GB",
        speed_case="sd15",
        module="remote.trainer.families.sd",
    ),
    "sdxl": FamilyFacts(
        name="sdxl",
        label="SDXL",
        # SDXL 1024px: b2 19.44 GiB / 134.6 ms; b1 12.36 GiB / 86.9 ms; b2 checkpointed 7.88 GiB / 184.4 ms
        memory=FamilyProfile(1024 * 1024, 6.60, 0.80, 39.2, 47.7, 1.37),
        architecture=Architecture(2_567_463_684, 123_060_480 + 694_659_840, 2_659_840, 165_888 + 737_280),
        download_gb=6.9,
        download_source="stabilityai sd_xl_base_1.0.safetensors, 6.94 GB",
        speed_case="sdxl",
        module="remote.trainer.families.sdxl",
    ),
}


def family_facts(name: str) -> FamilyFacts:
    """The facts of the family called ``name``; a clear error for an unknown one."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None
