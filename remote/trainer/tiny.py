"""Built-in tiny models: small, randomly initialised SD 1.5-, SDXL- and Flux.1-shaped models, built in code.

They have the real architectures' structure (kohya's module selection and naming apply unchanged) and a
real CLIP BPE tokenizer, but only ~1-3 M parameters, so the bundled example trains on a CPU in seconds.
Built deterministically from a fixed seed, so every machine builds the same weights. They show the
pipeline working; they do not make useful LoRAs.
"""

from __future__ import annotations

from typing import Any

import torch

from .tokenizers import BOS_ID, EOS_ID, clip_tokenizer

TINY_SEED = 1234


def _text_config(**overrides):
    from transformers import CLIPTextConfig

    values = dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        projection_dim=32,
        layer_norm_eps=1e-5,
    )
    values.update(overrides)
    return CLIPTextConfig(**values)


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def build_tiny(family: str):
    """Components of the tiny model of ``family`` (sd15, sdxl, flux): unet, vae, text_encoders, tokenizers (all
    float32, eval mode). Each family says its own UNet and text stack (families/)."""
    from .families import get_family

    return get_family(family).build_tiny()


def build_components(unet_config: dict, latent_scale: float, second_text_encoder: bool):
    """A tiny pipeline's components: a two-block UNet with the family's ``unet_config`` on top of the shared
    layout, a tiny VAE, one CLIP text encoder (and a second, projecting one for SDXL's layout)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    layout = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(**layout, **unet_config)
        torch.manual_seed(TINY_SEED + 1)
        vae = _vae(latent_scale)
        torch.manual_seed(TINY_SEED + 2)
        te1 = CLIPTextModel(_text_config())
        encoders: list[torch.nn.Module] = [te1]
        tokenizers = [clip_tokenizer()]
        if second_text_encoder:
            torch.manual_seed(TINY_SEED + 3)
            encoders.append(CLIPTextModelWithProjection(_text_config()))
            tokenizers.append(clip_tokenizer(pad_token="!"))
    finally:
        torch.random.set_rng_state(state)
    for module in [unet, vae, *encoders]:
        module.eval()
    return {"unet": unet, "vae": vae, "text_encoders": encoders, "tokenizers": tokenizers}


# A T5 SentencePiece-style (unigram) vocabulary small enough to write down: the special tokens, the word
# boundary, lowercase letters and digits alone and after a boundary. Real T5's ids 0-2 are the same tokens.
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
T5_PIECES = "abcdefghijklmnopqrstuvwxyz0123456789,.-'"


def t5_tokenizer():
    """A T5 tokenizer built offline (transformers' tokenizers-backed T5Tokenizer from a vocabulary list): pad 0, EOS 1,
    padding and truncation as google/t5-v1_1-xxl's."""
    from transformers import T5Tokenizer

    vocab = [(token, 0.0) for token in T5_SPECIALS] + [("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in T5_PIECES] + [("\u2581" + c, -2.5) for c in T5_PIECES]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_flux_components(latent_scale: float, latent_shift: float):
    """A tiny FLUX.1 [dev]: a FluxTransformer2DModel with two double and two single blocks (2 heads of 32,
    guidance embedding), a 16-channel VAE that downsamples 8x with Flux's scale and shift, CLIP-L-shaped and
    T5-shaped text encoders (32 wide) with the real CLIP tokenizer and an offline T5 one."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(TINY_SEED)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 14, 14),
        )
        torch.manual_seed(TINY_SEED + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=latent_scale,
            shift_factor=latent_shift,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        torch.manual_seed(TINY_SEED + 2)
        clip_l = CLIPTextModel(_text_config())
        torch.manual_seed(TINY_SEED + 3)
        tokenizer_2 = t5_tokenizer()
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=32,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                feed_forward_proj="gated-gelu",
                is_encoder_decoder=False,
                use_cache=False,
            )
        )
    finally:
        torch.random.set_rng_state(state)
    modules: list[Any] = [transformer, vae, clip_l, t5]  # diffusers' models, whose .eval mypy cannot follow
    for module in modules:
        module.eval()
    tokenizers = [clip_tokenizer(), tokenizer_2]
    return {"unet": transformer, "vae": vae, "text_encoders": [clip_l, t5], "tokenizers": tokenizers}
