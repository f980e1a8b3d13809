"""rentrain's bundled LoRA trainer: ``python -m remote.trainer CONFIG.toml [--resume STATE_DIR|last]``.

Modules: loop (the run, top to bottom), run_setup (building a run), step (one training step), speed (the fast
path: graphs, fused LoRA, channels_last GroupNorm, overlapped steps), families (one module per model family;
their plain facts without torch), models (load the base model through its family), tiny (built-in tiny
models), tokenizers, lora (kohya-compatible LoRA modules, export), lora_fused (flat buffers, fused LoRA
layers), group_norm, graphs (CUDA graphs), data (buckets, captions, latent cache), memory (fitting the card's
memory; no torch, the client uses it too), optim (optimizers, schedulers), distributed (data parallel),
checkpoints, resume, state (what a run writes and reads back), samples (grids). See docs/trainer.md.
"""
