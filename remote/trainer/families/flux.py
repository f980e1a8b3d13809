"""Flux.1 (``flux``), [dev] and [schnell]: a rectified-flow transformer (19 double-stream and 38 single-stream
blocks) over 2x2 patches of a 16-channel latent, conditioned on T5-XXL's token states and CLIP-L's pooled
embedding, and in [dev] on an embedded guidance scale. Trained as kohya's ``flux_train_network.py`` trains it
(flux_flow.py), with kohya's ``networks.lora_flux`` module names (flux_keys.py), on diffusers' modules.

Loading: a diffusers folder or hub id (FluxPipeline's subfolders), or BFL's single file (``flux1-dev.safetensors``,
original key layout) with the ``ae``, ``clip_l`` and ``t5xxl`` files beside it, as kohya takes them; each of the
three also replaces the folder's part when given. With ``fp8_base`` the transformer's block Linears are stored
in float8 (float8.py). The text encoders run once per caption (their outputs are cached) and are not adapted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from remote.config import T5_TOKENS_DEV, T5_TOKENS_SCHNELL

from . import clip, flux_keys
from .base import OMIT, Components, LoRATarget, ModelError, ModelFamily
from .flux_flow import FlowMatchObjective, image_ids, pack_latents, text_ids, unpack_latents

if TYPE_CHECKING:
    from remote.config import TrainConfig

    from ..models import ModelBundle

# BFL's autoencoder (diffusers' FLUX.1 vae/config.json): latents = (z - shift) * scale
AE_SCALE, AE_SHIFT = 0.3611, 0.1159
AE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": AE_SCALE,
    "shift_factor": AE_SHIFT,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# FLUX.1 [dev]'s transformer (diffusers' FluxTransformer2DModel config.json); [schnell] has no guidance embedding
FLUX_DEV_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
CLIP_L_CONFIG: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, projection_dim=768
)
T5_XXL_CONFIG: dict[str, Any] = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    is_encoder_decoder=False,
    use_cache=False,
)
T5_TOKENIZER_ID = "google/t5-v1_1-xxl"  # kohya's (strategy_flux.py); the single-file path fetches it on the instance
BLOCK_LINEARS = ("transformer_blocks.", "single_transformer_blocks.")  # what fp8_base stores in 8 bits


@dataclass(frozen=True)
class FluxOptions:
    """The run's Flux keys (TrainConfig, kohya's names and defaults)."""

    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "sigma_scaled"
    guidance_scale: float = 3.5
    t5xxl_max_token_length: int | None = None
    apply_t5_attn_mask: bool = False
    fp8_base: bool = False
    train_double_block_indices: frozenset[int] | None = None
    train_single_block_indices: frozenset[int] | None = None
    ae: str | None = None
    clip_l: str | None = None
    t5xxl: str | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> FluxOptions:
        values = {}
        for f in dataclasses.fields(cls):
            value = getattr(cfg, f.name, None)
            if value is not None:
                values[f.name] = value
        return cls(**values)


class Flux(ModelFamily):
    latent_scale = AE_SCALE
    latent_shift = AE_SHIFT
    text_encoder_lora = False
    sample_guidance = 3.5  # FLUX.1 [dev]'s embedded guidance, as kohya and Black Forest Labs sample it
    cudnn_attention = False  # its backward fails there (run_setup.choose_attention_kernels)
    fp16_throughout = False  # Flux.1's activations pass fp16's range: fp16 keeps autocast's float32 ops
    lora_parents = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    lora_conv_parents = ()
    text_lora_parents = clip.CLIP_LORA_PARENTS

    def __init__(self, name: str, options: FluxOptions | None = None):
        super().__init__(name)
        self.options = options or FluxOptions()

    def configure(self, cfg: TrainConfig) -> Flux:
        return Flux(self.name, FluxOptions.from_config(cfg))

    # --- loading --------------------------------------------------------------------------------------

    def load_diffusers(self, reference: str, dtype: torch.dtype, device: torch.device | None) -> Components:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

        on_gpu = device is not None and device.type == "cuda"
        place: dict[str, Any] = {"device_map": str(device)} if on_gpu else {}
        # fp8: read on the host and quantised layer by layer onto the GPU, never whole in 16 bits there
        transformer_place = {} if self.options.fp8_base else place
        transformer = self._stored(
            FluxTransformer2DModel.from_pretrained(
                reference, subfolder="transformer", torch_dtype=dtype, **transformer_place
            ),
            device,
        )
        opt = self.options
        vae = _load_ae(opt.ae) if opt.ae else AutoencoderKL.from_pretrained(reference, subfolder="vae", **place)
        # the text encoders are read on the host: they visit the GPU to fill the text cache (run_setup), and
        # T5-XXL's 9 GB beside the 8-bit transformer would not leave a 24 GB card room for the latents' cache
        clip_l = (
            _load_clip_l(opt.clip_l, dtype)
            if opt.clip_l
            else CLIPTextModel.from_pretrained(reference, subfolder="text_encoder", torch_dtype=dtype)
        )
        t5 = (
            _load_t5xxl(opt.t5xxl, dtype)
            if opt.t5xxl
            else T5EncoderModel.from_pretrained(reference, subfolder="text_encoder_2", torch_dtype=dtype)
        )
        tokenizers = [
            CLIPTokenizer.from_pretrained(reference, subfolder="tokenizer"),
            T5Tokenizer.from_pretrained(reference, subfolder="tokenizer_2"),
        ]
        return self._components(transformer, vae.to(torch.float32), [clip_l, t5], tokenizers)

    def load_single_file(
        self, path: Path, dtype: torch.dtype = torch.float32, device: torch.device | None = None
    ) -> Components:
        """BFL's transformer file (original layout, or diffusers' keys), with kohya's separate ``ae``, ``clip_l``
        and ``t5xxl`` files. CLIP-L's tokenizer is built offline; T5's is fetched from the hub (kohya's)."""
        from transformers import T5Tokenizer

        from ..tokenizers import clip_tokenizer

        opt = self.options
        missing = [key for key in ("ae", "clip_l", "t5xxl") if not getattr(opt, key)]
        if missing:
            raise ModelError(
                f"{path} holds Flux.1's transformer only: set {', '.join(missing)} to the autoencoder, CLIP-L and "
                "T5-XXL files (kohya's keys), or use a diffusers folder / hub id"
            )
        assert opt.ae and opt.clip_l and opt.t5xxl, "checked above"
        transformer = self._stored(load_transformer_file(path, dtype), device)
        encoders = [_load_clip_l(opt.clip_l, dtype), _load_t5xxl(opt.t5xxl, dtype)]
        tokenizers = [clip_tokenizer(), T5Tokenizer.from_pretrained(T5_TOKENIZER_ID)]
        return self._components(transformer, _load_ae(opt.ae), encoders, tokenizers)

    def build_tiny(self) -> Components:
        from ..tiny import build_flux_components

        parts = build_flux_components(AE_SCALE, AE_SHIFT)
        transformer = self._stored(parts["unet"], None)
        return self._components(transformer, parts["vae"], parts["text_encoders"], parts["tokenizers"])

    def _stored(self, transformer: Any, device: torch.device | None) -> Any:
        """The transformer as training keeps it: with fp8_base its block Linears in float8, quantised layer by
        layer onto ``device`` (a GPU) as soon as it is read, before the text encoders are read on the host (the
        host then never holds the 16-bit transformer and T5-XXL together)."""
        if self.options.fp8_base:
            from ..float8 import quantize_linears

            quantize_linears(transformer, lambda path: path.startswith(BLOCK_LINEARS), device)
        return transformer

    def _components(self, transformer: Any, vae: Any, encoders: list[Any], tokenizers: list[Any]) -> Components:
        """The parts, with the T5 tokenizer's length kohya's default for the variant unless
        t5xxl_max_token_length is set."""
        schnell = not transformer.config.guidance_embeds
        tokenizers[1].model_max_length = self.options.t5xxl_max_token_length or (
            T5_TOKENS_SCHNELL if schnell else T5_TOKENS_DEV
        )
        return {"unet": transformer, "vae": vae, "text_encoders": encoders, "tokenizers": tokenizers}

    def checkpoint_blocks(self, denoiser: nn.Module) -> list[nn.Module]:
        double: nn.ModuleList = denoiser.transformer_blocks  # type: ignore[assignment]
        single: nn.ModuleList = denoiser.single_transformer_blocks  # type: ignore[assignment]
        return [*double, *single]

    def model_info(self, parts: Components) -> dict[str, object]:
        return {"flux_variant": "dev" if parts["unet"].config.guidance_embeds else "schnell"}

    # --- text -----------------------------------------------------------------------------------------

    def tokenize(
        self, tokenizers: Sequence[Any], captions: list[str], max_token_length: int | None
    ) -> list[torch.Tensor]:
        """[CLIP-L ids [B, 77], T5 ids [B, T], T5 attention mask [B, T]] (kohya's FluxTokenizeStrategy; T is
        t5xxl_max_token_length, 512 for [dev] and 256 for [schnell] by default). ``max_token_length`` (the SD
        families' CLIP chunks) does not apply."""
        clip_tok, t5_tok = tokenizers
        clip_ids = clip_tok(captions, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
        length = t5_tok.model_max_length
        t5 = t5_tok(captions, max_length=length, padding="max_length", truncation=True, return_tensors="pt")
        return [clip_ids.input_ids, t5.input_ids, t5.attention_mask]

    def encode(
        self, text_encoders: Sequence[Any], ids: list[torch.Tensor], clip_skip: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5's last hidden state [B, T, 4096], CLIP-L's pooled output [B, 768]); T5 sees the attention mask
        with apply_t5_attn_mask (kohya's FluxTextEncodingStrategy). clip_skip does not apply."""
        clip_l, t5 = text_encoders
        pooled = clip_l(ids[0].to(clip_l.device)).pooler_output
        mask = ids[2].to(t5.device) if self.options.apply_t5_attn_mask else None
        context = t5(ids[1].to(t5.device), attention_mask=mask).last_hidden_state
        return context, pooled

    def text_conditions(self, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """With apply_t5_attn_mask, the T5 mask, which the transformer's attention also applies (kohya)."""
        return {"text_mask": ids[2]} if self.options.apply_t5_attn_mask else {}

    # --- training -------------------------------------------------------------------------------------

    def objective(self, v_prediction: bool) -> FlowMatchObjective:
        opt = self.options
        return FlowMatchObjective(
            opt.timestep_sampling,
            opt.sigmoid_scale,
            opt.discrete_flow_shift,
            opt.model_prediction_type,
        )

    def predict(
        self,
        unet: Any,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        pooled: torch.Tensor | None,
        conditions: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """kohya's call of the transformer: packed latents, position ids, t = timesteps / 1000 and, for [dev],
        the guidance scale (diffusers multiplies both by 1000 inside, as BFL's model does)."""
        assert pooled is not None, "CLIP-L gives Flux's pooled embedding"
        batch, _, height, width = noisy.shape
        device, dtype = noisy.device, noisy.dtype
        guidance = None
        if unet.config.guidance_embeds:
            guidance = torch.full((batch,), float(self.options.guidance_scale), device=device, dtype=dtype)
        out = unet(
            hidden_states=pack_latents(noisy),
            encoder_hidden_states=context,
            pooled_projections=pooled.to(dtype),
            timestep=(timesteps / 1000).to(dtype),
            img_ids=image_ids(height, width, device),
            txt_ids=text_ids(context.shape[1], device),
            guidance=guidance,
            joint_attention_kwargs=_attention_mask(conditions.get("text_mask"), (height // 2) * (width // 2)),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width)

    # --- LoRA -----------------------------------------------------------------------------------------

    def kohya_unet_namer(self, unet: nn.Module) -> Callable[[str], str]:
        return flux_keys.kohya_path

    def lora_targets(self, unet: nn.Module, conv_dim: int | None) -> list[LoRATarget]:
        """kohya's lora_flux modules of the selected blocks (train_double_block_indices /
        train_single_block_indices; all by default), a fused layer's diffusers Linears sharing one LoRA."""
        found: list[LoRATarget] = []
        for blocks_name, (kohya_block, targets) in flux_keys.DIFFUSERS_BLOCKS.items():
            blocks: Any = getattr(unet, blocks_name)
            key = f"train_{kohya_block.split('_')[0]}_block_indices"
            try:
                chosen = flux_keys.block_selection(getattr(self.options, key), len(blocks), key)
            except ValueError as exc:
                raise ModelError(str(exc)) from None
            for index, block in enumerate(blocks):
                if not chosen[index]:
                    continue
                for name, members in targets:
                    modules = tuple(block.get_submodule(member) for member in members)
                    kohya_name = f"lora_unet_{kohya_block}_{index}_{name.replace('.', '_')}"
                    found.append(LoRATarget(kohya_name, modules, False))
        return found

    # --- sampling and export --------------------------------------------------------------------------

    def sampling_pipeline(self, bundle: ModelBundle, scheduler: Any) -> Any:
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        if not bundle.unet.config.guidance_embeds:  # [schnell] samples its schedule unshifted
            scheduler = FlowMatchObjective(dynamic_shifting=False).sampling_scheduler()

        return FluxPipeline(
            scheduler=scheduler,
            vae=bundle.vae,
            text_encoder=bundle.text_encoders[0],
            tokenizer=bundle.tokenizers[0],
            text_encoder_2=bundle.text_encoders[1],
            tokenizer_2=bundle.tokenizers[1],
            transformer=bundle.unet,
        )

    def pipeline_embeds(
        self,
        context: torch.Tensor,
        pooled: torch.Tensor | None,
        conditions: dict[str, torch.Tensor],
        size: tuple[int, int],
    ) -> dict[str, Any]:
        """The prompt's embeddings only: [dev] is guidance-distilled (its guidance is an input, not a second
        pass with the negative prompt), [schnell] takes none."""
        assert pooled is not None, "CLIP-L gives Flux's pooled embedding"
        width, height = size
        kwargs: dict[str, Any] = {"prompt_embeds": context[:1], "pooled_prompt_embeds": pooled[:1]}
        mask = conditions.get("text_mask")
        attention = _attention_mask(None if mask is None else mask[:1], (height // 16) * (width // 16))
        if attention is not None:
            kwargs["joint_attention_kwargs"] = attention
        return kwargs

    def latents_for_decoding(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """FluxPipeline's latent output is packed: unpack it, then undo the scale and shift."""
        width, height = size
        latents = unpack_latents(latents, 2 * (height // 16), 2 * (width // 16))
        return latents / self.latent_scale + self.latent_shift

    def base_model_metadata(self, v_prediction: bool, info: Mapping[str, object] | None = None) -> dict[str, object]:
        """What kohya's flux_train_network writes (train_network's ss_* keys with model_version "flux1", its
        update_metadata, and sai_model_spec's Flux architecture); Flux has no prediction type there."""
        opt = self.options
        variant = (info or {}).get("flux_variant")
        return {
            "ss_v2": False,
            "ss_base_model_version": "flux1",
            "ss_network_module": "networks.lora_flux",
            "ss_model_type": "flux",
            "ss_apply_t5_attn_mask": opt.apply_t5_attn_mask,
            "ss_weighting_scheme": "uniform",
            "ss_guidance_scale": opt.guidance_scale,
            "ss_timestep_sampling": opt.timestep_sampling,
            "ss_sigmoid_scale": opt.sigmoid_scale,
            "ss_model_prediction_type": opt.model_prediction_type,
            "ss_discrete_flow_shift": opt.discrete_flow_shift,
            "modelspec.architecture": f"flux-1-{variant}/lora" if variant else "flux-1/lora",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux",
            "modelspec.prediction_type": OMIT,
        }


def _attention_mask(text_mask: torch.Tensor | None, image_tokens: int) -> dict[str, torch.Tensor] | None:
    """kohya's transformer mask: the T5 mask, then every image token, as a boolean key mask [B, 1, 1, T + N]."""
    if text_mask is None:
        return None
    keys = torch.cat([text_mask.bool(), text_mask.new_ones(text_mask.shape[0], image_tokens, dtype=torch.bool)], 1)
    return {"attention_mask": keys[:, None, None, :]}


# ---------------------------------------------------------------------------------------------------
# Single files


def _read_state(path: Path | str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise ModelError(f"cannot read {path} as a .safetensors file: {exc}") from exc


def load_transformer_file(path: Path | str, dtype: torch.dtype) -> Any:
    """FluxTransformer2DModel from one file in BFL's layout (or diffusers' keys), its config read from the
    tensors' shapes: no download."""
    from diffusers import FluxTransformer2DModel

    state = _read_state(path)
    try:
        converted = flux_keys.original_to_diffusers(state) if flux_keys.is_original_layout(list(state)) else state
        config = flux_keys.transformer_config(converted)
    except (KeyError, ValueError) as exc:
        raise ModelError(f"{path}: not a Flux.1 transformer ({exc})") from None
    with torch.device("meta"):
        model: Any = FluxTransformer2DModel(**config)
    missing, unexpected = model.load_state_dict(
        {k: v.to(dtype) for k, v in converted.items()}, strict=False, assign=True
    )
    if missing or unexpected:
        raise ModelError(f"{path}: Flux.1 transformer tensors missing {missing[:3]} / unexpected {unexpected[:3]}")
    return model


def _load_ae(reference: str) -> Any:
    """BFL's ae.safetensors (converted with diffusers' LDM VAE mapping), or a diffusers folder / hub id."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if Path(reference).is_file():
        model: Any = AutoencoderKL(**AE_CONFIG)
        converted = convert_ldm_vae_checkpoint(_read_state(reference), AE_CONFIG)
        expected = model.state_dict()
        for name, tensor in converted.items():
            if name in expected and tensor.shape != expected[name].shape:  # e.g. SD's VAE: 4 latent channels
                raise ModelError(
                    f"ae = {reference}: not Flux.1's autoencoder: {name} is {tuple(tensor.shape)}, "
                    f"not {tuple(expected[name].shape)}"
                )
        missing, _ = model.load_state_dict(converted, strict=False)
        if missing:
            raise ModelError(f"ae = {reference}: not Flux.1's autoencoder (missing {missing[:3]})")
        return model
    folder = Path(reference)
    subfolder = "vae" if (folder / "vae").is_dir() else None
    return AutoencoderKL.from_pretrained(reference, subfolder=subfolder)


def _load_clip_l(path: str, dtype: torch.dtype) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return _load_encoder(path, dtype, lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG)), "clip_l")


def _load_t5xxl(path: str, dtype: torch.dtype) -> Any:
    from transformers import T5Config, T5EncoderModel

    return _load_encoder(path, dtype, lambda: T5EncoderModel(T5Config(**T5_XXL_CONFIG)), "t5xxl")


def _load_encoder(path: str, dtype: torch.dtype, build: Callable[[], nn.Module], key: str) -> Any:
    """A text encoder from a single file in transformers' key layout, as kohya's flux_utils.load_clip_l and
    load_t5xxl read clip_l and t5xxl: CLIP-L's keys under ``text_model.`` (which transformers 5's CLIPTextModel
    lacks), T5's embedding as ``shared.weight`` only (tied here), float8 files widened to ``dtype``. Parameters
    are built on meta and buffers for real (accelerate's init_empty_weights), so CLIP's position ids move."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model: Any = build()
    state = _read_state(path)
    if "scaled_fp8" in state:
        raise ModelError(
            f"{key} = {path}: ComfyUI's scaled float8 file (key scaled_fp8) holds a scale per weight that is not "
            "applied here; use the fp16 or the plain fp8_e4m3fn file"
        )
    if "encoder.embed_tokens.weight" in state:  # T5's second name for the embedding the model ties to shared
        state.setdefault("shared.weight", state.pop("encoder.embed_tokens.weight"))
    expected = model.state_dict()
    anchor = next(iter(expected))  # the file's name for it tells the prefix: "text_model." in CLIP-L's
    prefix = next((name[: -len(anchor)] for name in state if name == anchor or name.endswith(f".{anchor}")), "")
    loadable: dict[str, torch.Tensor] = {}
    for name, wanted in expected.items():
        stored = state.pop(prefix + name, None)
        if stored is None:
            continue
        if stored.shape != wanted.shape:
            raise ModelError(f"{key} = {path}: {prefix}{name} is {tuple(stored.shape)}, not {tuple(wanted.shape)}")
        loadable[name] = stored.to(dtype)
    model.load_state_dict(loadable, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, _ in model.named_parameters() if name not in loadable]  # a tied one is named once
    if missing:
        raise ModelError(f"{key} = {path}: {len(missing)} tensors missing, e.g. {prefix}{missing[0]}")
    return model


FLUX = Flux("flux")
IMPLEMENTATIONS: dict[str, ModelFamily] = {"flux": FLUX}
