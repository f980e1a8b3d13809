"""The plain facts of each model family, without torch: what the client (rentrain, on the laptop) and the
trainer's memory planning need to know about a family before any model is loaded.

The trainer's own side of a family (loading, text encoding, the training target, LoRA names, sampling) is
in its module beside this one (sd.py, sdxl.py, flux.py); both are looked up by the family's name (``sd15``,
``sd2``, ``sdxl``, ``flux``), the name the events and states carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FamilyProfile:
    """Measured on an H200 with bf16 and CUDA graphs (bench/RESULTS.md; Flux.1 on an H100, see its entry): peak
    activation memory per sample of ``reference_pixels``, and the step time of a micro-batch of m such samples,
    ``overhead + m * per_sample``. Both grow with the sample's tokens: a UNet's pixels, or a transformer's
    patches plus the text tokens it attends over (``tokens``)."""

    reference_pixels: int
    activation_gib: float
    checkpointed_gib: float
    overhead_ms: float
    per_sample_ms: float
    checkpointing_factor: float
    pixels_per_token: int = 1
    text_tokens: int = 0
    # whether a run measured the activations without checkpointing: only then may the planner turn configured
    # checkpointing off (a derived figure that is too low would run the card out of memory)
    plain_activations_measured: bool = True
    # the standard architecture's blocks that checkpointing wraps (ModelFamily.checkpoint_blocks), when they are
    # alike enough that k of them hold k / checkpoint_blocks of the activations and of the recompute, so that
    # the planner may leave the last few unchecked; 0: checkpointing is all or nothing (a UNet's blocks differ
    # many times over in size)
    checkpoint_blocks: int = 0

    def tokens(self, pixels: int) -> float:
        return pixels / self.pixels_per_token + self.text_tokens

    def scale(self, pixels: int) -> float:
        """A sample of ``pixels`` against the reference sample (activations and per-sample time)."""
        return self.tokens(pixels) / self.tokens(self.reference_pixels)


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
    name: str  # the key: "sd15", "sd2", "sdxl", "flux"
    label: str  # for people: "SD 1.x"
    memory: FamilyProfile
    architecture: Architecture | None  # None: not counted (planning then uses the loaded model's own)
    download_gb: float  # the usual single-file checkpoint, with the separate files a job needs (Flux.1's encoders)
    download_source: str
    speed_case: str | None  # bench/train_speed.py's case whose measurements rentrain's speed model uses
    module: str  # the trainer's implementation (needs torch), imported only when a run needs it
    part_gb: dict[str, float] = field(default_factory=dict)  # of download_gb, the files a config names apart

    @property
    def checkpointing_factor(self) -> float:
        """Step-time factor of gradient checkpointing (measured, see ``memory``)."""
        return self.memory.checkpointing_factor


# SD 1.5 512px: b4 6.14 GiB / 59.4 ms; b2 4.08-4.25 GiB / 32.6-35.0 ms; b4 checkpointed 3.27 GiB / 94.3 ms
_SD_MEMORY = FamilyProfile(512 * 512, 1.04, 0.28, 5.7, 13.4, 1.59)

# Flux.1 [dev]'s files, GB as the Hugging Face file lists give them (download_source)
_FLUX_PARTS_GB = {"model": 23.8, "t5xxl": 9.79, "clip_l": 0.246, "ae": 0.335}

# Flux.1 [dev], measured on an H100 (bench/RESULTS.md, eleventh session; kohya's recipe: dim 16, 8-bit base),
# peak allocated GiB while training and ms a step:
#   checkpointed, 24 GiB cap:   1024px 15.12 / 733.0, 512px 13.65 / 263.8
#   not checkpointed, no cap:   1024px 43.51 / 529.3, 512px 23.22 / 185.4
# Activations per 1024px sample: 32.2 GiB without checkpointing, 3.42 with it: each the least that keeps both
# estimates at or above their measurements (44.7 and 23.24 GiB; 15.93 and 13.65 GiB). Counted (bench/step_work.py
# --flux: what autograd keeps, or the blocks' inputs, plus the largest block's activations and gradients): 31.5
# and 2.68. Step time: the uncheckpointed steps, 13.4 ms + 515.9 ms a 1024px sample scaled by tokens.
# Checkpointing: x1.39 (733.0 / 529.3 at 1024px; x1.42 at 512px).
_FLUX_MEMORY = FamilyProfile(
    1024 * 1024,
    32.2,
    3.42,
    13.4,
    515.9,
    1.39,
    pixels_per_token=16 * 16,
    text_tokens=512,
    checkpoint_blocks=19 + 38,  # double- and single-stream blocks
)

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
    "flux": FamilyFacts(
        name="flux",
        label="Flux.1",
        memory=_FLUX_MEMORY,
        # counted on the meta device (bench/step_work.py --flux): diffusers' FluxTransformer2DModel with the
        # guidance embedding ([dev]); T5-XXL's encoder and CLIP-L. LoRA per dim: kohya's lora_flux module set
        # (every Linear of the 19 double and 38 single blocks, qkv fused); CLIP-L's as for SD.
        architecture=Architecture(11_901_408_320, 4_762_310_656 + 123_060_480, 4_786_176, 165_888),
        download_gb=round(sum(_FLUX_PARTS_GB.values()), 2),
        download_source="huggingface.co file lists: black-forest-labs/FLUX.1-dev flux1-dev.safetensors 23.8 GB "
        "and ae.safetensors 335 MB; comfyanonymous/flux_text_encoders t5xxl_fp16.safetensors 9.79 GB and "
        "clip_l.safetensors 246 MB",
        speed_case="flux",
        module="remote.trainer.families.flux",
        part_gb={key: gb for key, gb in _FLUX_PARTS_GB.items() if key != "model"},
    ),
}


def family_facts(name: str) -> FamilyFacts:
    """The facts of the family called ``name``; a clear error for an unknown one."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None
