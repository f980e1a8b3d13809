"""Sample grids: each prompt x seed (rows) at each LoRA weight (columns), one labelled PNG per checkpoint.

The same check users do by hand in A1111 (``<lora:name:0.5>`` ... ``<lora:name:1>``), done on the
rented GPU before it is given back. Images come from the family's diffusers pipeline (SD / SDXL with a
DDIM sampler, Flux.1 with its flow-matching Euler sampler); prompts are encoded with the trainer's own
(kohya) text conditioning, so clip_skip means what it means in training. The LoRA multiplier applies to the
UNet and the text encoder(s), as in A1111.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .models import ModelBundle, encode, tokenize

if TYPE_CHECKING:
    from .run_setup import Run


@dataclass
class SamplePrompt:
    prompt: str
    negative: str = ""


def read_prompts(value) -> list[SamplePrompt]:
    """A list of prompts, or a kohya prompt file (one per line; ``--n negative`` is read, other options ignored)."""
    if value is None:
        return []
    lines = Path(value).read_text(encoding="utf-8").splitlines() if isinstance(value, (str, Path)) else list(value)
    prompts = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"\s--(?=[a-z]+\s)", " " + line)
        prompt = parts[0].strip()
        negative = ""
        for option in parts[1:]:
            key, _, rest = option.partition(" ")
            if key == "n":
                negative = rest.strip()
        if prompt:
            prompts.append(SamplePrompt(prompt, negative))
    return prompts


def _pipeline(bundle: ModelBundle):
    """The family's pipeline over the bundle's modules, with a DDIM-style sampler of its training schedule."""
    pipe = bundle.spec.sampling_pipeline(bundle, bundle.objective().sampling_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_images(
    bundle: ModelBundle,
    network,
    prompts: list[SamplePrompt],
    weights: list[float],
    seeds: list[int],
    steps: int,
    guidance: float,
    size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
    clip_skip: int | None = None,
    max_token_length: int | None = None,
):
    """[[PIL image per weight] per (prompt, seed)]. Leaves the network's multiplier at 1.0.

    Every prompt is encoded first, with the text encoders on the GPU, and they leave it before the denoising:
    Flux.1's T5-XXL (9 GB) is never there beside the transformer and the sampler's activations."""
    pipe = _pipeline(bundle)
    vae_device = next(bundle.vae.parameters()).device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    try:
        conditions = _encode_prompts(
            bundle, network, prompts, weights, size, device, autocast, clip_skip, max_token_length
        )
        bundle.vae.to(device)
        rows = []
        for prompt_index in range(len(prompts)):
            for seed in seeds:
                row = []
                for weight_index, weight in enumerate(weights):
                    network.set_multiplier(weight)
                    with torch.no_grad(), autocast:
                        generator = torch.Generator(device=device).manual_seed(int(seed))
                        latents = pipe(
                            num_inference_steps=steps,
                            guidance_scale=guidance,
                            width=size[0],
                            height=size[1],
                            generator=generator,
                            output_type="latent",
                            **conditions[prompt_index][weight_index],
                        ).images
                    # decode in float32, outside autocast: SDXL's VAE gives NaNs (black images) in fp16
                    with torch.no_grad():
                        decoded = bundle.vae.decode(
                            bundle.spec.latents_for_decoding(latents.float(), size), return_dict=False
                        )[0]
                    image = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
                    row.append(image)
                rows.append(row)
    finally:
        network.set_multiplier(1.0)
        bundle.vae.to(vae_device)
    return rows


def _encode_prompts(
    bundle: ModelBundle,
    network,
    prompts: list[SamplePrompt],
    weights: list[float],
    size: tuple[int, int],
    device: torch.device,
    autocast,
    clip_skip: int | None,
    max_token_length: int | None,
) -> list[list[dict]]:
    """The pipeline's conditioning keywords per prompt and LoRA weight (a text-encoder LoRA changes them);
    the text encoders are back where they were on return."""
    te_devices = [next(te.parameters()).device for te in bundle.text_encoders]
    for encoder in bundle.text_encoders:
        encoder.to(device)
    try:
        # the LoRA weight changes the encoding only through a text-encoder LoRA
        encoded_weights = weights if network.te_names else weights[:1]
        conditions = []
        for prompt in prompts:
            per_weight = []
            for weight in encoded_weights:
                network.set_multiplier(weight)
                with torch.no_grad(), autocast:
                    ids = tokenize(bundle, [prompt.prompt, prompt.negative], max_token_length)
                    context, pooled = encode(bundle, ids, clip_skip)
                    extras = {name: v.to(device) for name, v in bundle.spec.text_conditions(ids).items()}
                    per_weight.append(bundle.spec.pipeline_embeds(context, pooled, extras, size))
            conditions.append(per_weight if network.te_names else per_weight * len(weights))
        return conditions
    finally:
        for encoder, where in zip(bundle.text_encoders, te_devices, strict=True):
            encoder.to(where)


def make_grid(rows, prompts: list[SamplePrompt], seeds: list[int], weights: list[float], title: str):
    """One PNG: a title line, a header with the LoRA weights, a label column with prompt and seed."""
    from PIL import Image, ImageDraw, ImageFont

    cell_w, cell_h = rows[0][0].size
    size = max(12, cell_h // 24)  # labels readable at 64 px and at 1024 px
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    chars = max(16, int(cell_w * 0.6 / (size * 0.6)))
    label_w = int(chars * size * 0.6) + 8
    header_h = 3 * size
    width = label_w + cell_w * len(weights)
    height = header_h + cell_h * len(rows)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 2), title, fill="black", font=font)
    for col, weight in enumerate(weights):
        draw.text((label_w + col * cell_w + 4, int(1.6 * size)), f"weight {weight:g}", fill="black", font=font)
    labels = [(p, s) for p in prompts for s in seeds]
    max_lines = max(1, cell_h // int(size * 1.25) - 1)
    for index, (row, (prompt, seed)) in enumerate(zip(rows, labels, strict=True)):
        top = header_h + index * cell_h
        text = prompt.prompt
        lines = [text[i : i + chars] for i in range(0, len(text), chars)][:max_lines]
        draw.multiline_text((4, top + 2), "\n".join([*lines, f"seed {seed}"]), fill="black", font=font)
        for col, image in enumerate(row):
            grid.paste(image, (label_w + col * cell_w, top))
    return grid


def sample_grid(run: Run, path: Path, title: str) -> Path | None:
    """Render and save one grid for the run's current weights. None when no prompts are configured."""
    cfg = run.cfg
    prompts = read_prompts(cfg.sample_prompts)
    if not prompts:
        return None
    rows = render_images(
        run.bundle,
        run.network,
        prompts,
        list(cfg.sample_weights),
        list(cfg.sample_seeds),
        cfg.sample_steps,
        cfg.sample_guidance_scale if cfg.sample_guidance_scale is not None else run.bundle.spec.sample_guidance,
        cfg.resolution,
        run.device,
        run.dtype,
        cfg.clip_skip,
        cfg.max_token_length,
    )
    grid = make_grid(rows, prompts, list(cfg.sample_seeds), list(cfg.sample_weights), title)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return path
