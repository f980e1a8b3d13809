"""The billed time around training, phase by phase, and the bytes each phase moves (docs/costs.md, "Setup,
transfer and storage").

Every phase is a fixed part plus bytes / a link speed. The speeds are the offer's own where the provider
publishes them (Vast: `inet_down`, `inet_up`, Mbit/s) and the figures below where it does not. The phases run
one after another, except that the dataset upload runs beside the instance's installs and model download
(rentrain/job_phases/prepare.py): the upload phase counts only the time it outlasts them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal, get_args

from providers.base import Offer
from remote.trainer.families import family_facts
from rentrain.figures import Figure

if TYPE_CHECKING:
    from rentrain.job_profile import JobProfile

Phase = Literal[
    "image_pull", "bootstrap", "model_download", "upload", "latent_cache", "text_cache", "samples", "fetch", "teardown"
]
PHASES: tuple[Phase, ...] = get_args(Phase)
OUTBOUND: frozenset[Phase] = frozenset({"fetch"})  # the instance sends; every other transfer it receives

MBIT_PER_GB = 8000.0

SETUP: dict[str, Figure] = {
    "start_s": Figure(
        90.0,
        "assumed",
        "the host schedules the instance, creates the container and starts sshd, beside the image pull (Vast "
        "hello-world.mdx: an instance boots in 1-5 min in all)",
    ),
    "image_gb": Figure(
        4.0,
        "assumed",
        "the default image (pytorch/pytorch 2.11.0 CUDA 12.8 cuDNN 9 runtime), compressed, as pulled; a host that "
        "has it cached pulls nothing, so this is the high side",
    ),
    "bootstrap_s": Figure(90.0, "assumed", "remote/bootstrap.sh: Python check, pip resolving and unpacking, GPU check"),
    "install_gb": Figure(
        0.6, "assumed", "the wheels of remote/requirements.txt the image lacks (diffusers, transformers, bitsandbytes)"
    ),
    "cache_s_per_image": Figure(0.15, "assumed", "VAE-encoding one image to latents, once"),
    "text_cache_s_per_image": Figure(
        0.02, "assumed", "one text-encoder pass per caption, cached once when the encoders are not trained"
    ),
    "sample_step_fraction": Figure(
        2 / 3,
        "derived",
        "a sampler step runs the UNet forward twice (classifier-free guidance); a forward is about a third of a "
        "training step per image, the backward pass costing about twice the forward",
    ),
    "sample_step_s_default": Figure(
        0.05, "assumed", "a sampler step per image where the GPU is not known: a mid-range card at 512 px"
    ),
    "sample_decode_s": Figure(0.5, "assumed", "VAE decode in float32 and PNG encoding, per sample image"),
    "fetch_s": Figure(15.0, "assumed", "checking the results' sizes and names before the copy home"),
    "teardown_s": Figure(30.0, "assumed", "the destroy call and rentrain's check that the instance is gone"),
    "default_download_mbps": Figure(
        500.0,
        "assumed",
        "the instance's downlink where the provider publishes none (RunPod); Vast offers carry inet_down",
    ),
    "default_upload_mbps": Figure(
        500.0, "assumed", "the instance's uplink where the provider publishes none (RunPod); Vast offers carry inet_up"
    ),
    "max_effective_download_mbps": Figure(2000.0, "assumed", "model hubs and registries rarely serve one file faster"),
    "user_upload_mbps": Figure(40.0, "assumed", "a typical home uplink, for the dataset and a local base model"),
    "user_download_mbps": Figure(100.0, "assumed", "a typical home downlink, for the results"),
    "state_bytes_per_parameter": Figure(
        12.0, "derived", "a training state holds the LoRA in float32 and AdamW's two moments: 4 + 2 x 4 bytes"
    ),
    "png_bytes_per_pixel": Figure(1.5, "assumed", "a PNG of generated images: about half the 3 bytes of a raw pixel"),
}


def transfer_gb(profile: JobProfile) -> dict[str, float]:
    """GB each phase moves: in to the instance, except the fetch (OUTBOUND)."""
    model_gb = 0.0 if profile.builtin_tiny else model_download_gb(profile).value
    return {
        "image_pull": SETUP["image_gb"].value,
        "bootstrap": SETUP["install_gb"].value,
        "model_download": model_gb,
        "upload": (profile.dataset_bytes + profile.local_model_bytes) / 1e9,
        "fetch": fetch_bytes(profile) / 1e9,
    }


def fetch_bytes(profile: JobProfile) -> float:
    """What comes home over the job: each checkpoint's LoRA file and training state (the final one included),
    and the sample grids."""
    return profile.checkpoints * _checkpoint_bytes(profile) + profile.sample_images * _sample_image_bytes(profile)


def final_fetch_bytes(profile: JobProfile) -> float:
    """What comes home after training: the last checkpoint and the last grid. The earlier ones come home while
    training runs (rentrain/job_phases/fetch.py), in no billed time of their own."""
    last_grid = profile.sample_images // profile.sample_grids if profile.sample_grids else 0
    return _checkpoint_bytes(profile) + last_grid * _sample_image_bytes(profile)


def _checkpoint_bytes(profile: JobProfile) -> float:
    return lora_parameters(profile) * (profile.save_bytes_per_value + SETUP["state_bytes_per_parameter"].value)


def _sample_image_bytes(profile: JobProfile) -> float:
    return profile.resolution[0] * profile.resolution[1] * SETUP["png_bytes_per_pixel"].value


def lora_parameters(profile: JobProfile) -> int:
    """The LoRA's parameters (remote/trainer/memory.py's counts); the built-in tiny models' are negligible."""
    from remote.trainer.memory import ARCHITECTURES

    if profile.family not in ARCHITECTURES:
        return 0
    _, _, per_rank_unet, per_rank_text = ARCHITECTURES[profile.family]
    return profile.network_dim * (per_rank_unet + (per_rank_text if profile.trains_text_encoder else 0))


def setup_seconds(
    profile: JobProfile, offer: Offer | None, train_seconds_per_image: float | None = None
) -> dict[str, float]:
    """Each phase's billed seconds on this offer (None: the default link speeds). ``train_seconds_per_image``
    is one image's share of a training step on the offer's GPU, which the sample time follows; None where the
    GPU is not known."""
    gb = transfer_gb(profile)
    down = _instance_download_mbps(offer)
    up = (offer.upload_mbps if offer else None) or SETUP["default_upload_mbps"].value
    bootstrap = SETUP["bootstrap_s"].value + gb["bootstrap"] * MBIT_PER_GB / down
    model = gb["model_download"] * MBIT_PER_GB / down
    upload = gb["upload"] * MBIT_PER_GB / min(SETUP["user_upload_mbps"].value, down)
    text_cache = 0 if profile.trains_text_encoder else profile.images * SETUP["text_cache_s_per_image"].value
    return {
        "image_pull": SETUP["start_s"].value + gb["image_pull"] * MBIT_PER_GB / down,
        "bootstrap": bootstrap,
        "model_download": model,
        "upload": max(0.0, upload - bootstrap - model),  # beside the installs and the download
        "latent_cache": profile.images * SETUP["cache_s_per_image"].value,
        "text_cache": text_cache,
        "samples": profile.sample_images * _sample_seconds_per_image(profile, train_seconds_per_image),
        "fetch": SETUP["fetch_s"].value
        + final_fetch_bytes(profile) * 8 / 1e6 / min(up, SETUP["user_download_mbps"].value),
        "teardown": SETUP["teardown_s"].value,
    }


def _instance_download_mbps(offer: Offer | None) -> float:
    published = offer.download_mbps if offer else None
    return min(published or SETUP["default_download_mbps"].value, SETUP["max_effective_download_mbps"].value)


def _sample_seconds_per_image(profile: JobProfile, train_seconds_per_image: float | None) -> float:
    if train_seconds_per_image is None:
        step = SETUP["sample_step_s_default"].value
    else:
        step = train_seconds_per_image * SETUP["sample_step_fraction"].value
    return profile.sample_steps * step + SETUP["sample_decode_s"].value


def bandwidth_usd(transfer: Mapping[str, float], offer: Offer) -> float:
    """GB in x the offer's inbound $/GB + GB out x its outbound $/GB; nothing where the provider bills none
    (RunPod: 0) or does not say (None)."""
    gb_out = sum(gb for phase, gb in transfer.items() if phase in OUTBOUND)
    gb_in = sum(transfer.values()) - gb_out
    return gb_in * (offer.inet_down_usd_per_gb or 0.0) + gb_out * (offer.inet_up_usd_per_gb or 0.0)


def model_download_gb(profile: JobProfile) -> Figure:
    """What the instance downloads of the family's usual base model (remote.trainer.families): all of it, less
    the parts uploaded from this machine (a local model; Flux.1's local ae, clip_l, t5xxl files)."""
    facts = family_facts(profile.family)
    parts = {"model": facts.download_gb - sum(facts.part_gb.values()), **facts.part_gb}
    gb = sum(size for part, size in parts.items() if part not in profile.local_parts)
    return Figure(round(gb, 3), "published", facts.download_source)
