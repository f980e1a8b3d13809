"""rentrain's bundled LoRA trainer: ``python -m remote.trainer CONFIG.toml [--resume STATE_DIR|last]``.

Modules: models (load the base model, detect its family), tiny (built-in tiny models), tokenizers,
lora (kohya-compatible LoRA modules, export), lora_fused (flat buffers, fused LoRA layers), data (buckets,
captions, latent cache), loop (training), graphs (CUDA graphs), memory (fitting the card's memory; no
torch, the client uses it too), optim (optimizers, schedulers), distributed (data parallel), state
(resume), samples (grids). See docs/trainer.md.
"""
