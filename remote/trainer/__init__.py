"""rentrain's bundled LoRA trainer: ``python -m remote.trainer CONFIG.toml [--resume STATE_DIR|last]``.

Modules: models (load the base model, detect its family), tiny (built-in tiny models), tokenizers,
lora (kohya-compatible LoRA modules, export), data (buckets, captions, latent cache), loop (training),
optim (optimizers, schedulers), state (resume), samples (grids). See docs/trainer.md.
"""
