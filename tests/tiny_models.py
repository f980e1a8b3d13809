"""The builtin tiny SD 1.5 saved as a diffusers folder: a base model that is a local folder, for the tests."""

from __future__ import annotations

from pathlib import Path


def save_tiny_sd15_folder(folder: Path) -> Path:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from remote.trainer.tiny import build_tiny

    parts = build_tiny("sd15")
    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoders"][0],
        tokenizer=parts["tokenizers"][0],
        unet=parts["unet"],
        scheduler=DDPMScheduler(clip_sample=False, steps_offset=1),  # as SD's own, which diffusers expects
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder
