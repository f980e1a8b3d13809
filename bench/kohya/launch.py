"""Runs one of kohya sd-scripts' training scripts as ``python SCRIPT ARGS...`` would, with what
bench/kohya_speed.py needs around it:

    python bench/kohya/launch.py SD_SCRIPTS_DIR SCRIPT [ARGS...]

Step timing. sd-scripts' training loop (train_network.py NetworkTrainer.train, which flux_train_network.py
inherits) advances one tqdm bar, made with desc "steps" right before the first epoch, by one after each optimizer
step, and then reads the loss with ``loss.detach().item()``, which waits for the GPU: the host cannot run ahead,
so the time between two updates is one step's. tqdm's __init__, update and set_postfix are wrapped, and each
event of that bar is appended as one JSON line to the file $KOHYA_BENCH_EVENTS:

    {"event": "loop", "time": T, "gpu_peak_gib": G}             the bar is made: loading and caching are done
    {"event": "step", "time": T, "step": N, "gpu_peak_gib": G}   after each optimizer step
    {"event": "loss", "value": V}                                 the bar's avr_loss (kohya's moving average)

T is time.time(); G is torch.cuda.max_memory_allocated() since the process started (a host-side counter, read
without synchronising), as the trainer's own peak reports count. No CUDA call is made before sd-scripts makes one
but KOHYA_BENCH_CAP_GIB's.

Modules the machine may lack: cv2 (OpenCV) and torchvision fall back to bench/kohya/stubs (see each stub's
docstring) only when the real one does not import.

Compatibility with transformers 5 (sd-scripts pins transformers 4.54; the lent GPU has 5.x), applied only where
the installed transformers needs them, each restoring 4.x behaviour that sd-scripts relies on:

    CLIPTextModel.text_model   transformers 5's CLIPTextModel is the text transformer itself (no .text_model
                               submodule); train_network.py and strategy_sd.py reach .text_model.embeddings and
                               .text_model.final_layer_norm. A read-only property returns the model itself.
    CLIPFeatureExtractor       removed in transformers 5 (the deprecated name of CLIPImageProcessor);
                               library/lpw_stable_diffusion.py imports it at the top (sampling code, unused here).
    flux_utils.load_t5xxl      transformers 5's T5EncoderModel keeps encoder.embed_tokens apart from shared (tied
                               by name, not one module), so loading a file that holds only shared.weight with
                               assign=True leaves encoder.embed_tokens on the meta device. The result is re-tied.

Switches from bench/kohya_speed.py, in the environment:
    KOHYA_BENCH_T5_CONFIG         JSON T5Config keyword overrides for flux_utils.load_t5xxl, which hard-codes
                                  T5-XXL's size (--smoke only: a small T5 on the CPU)
    KOHYA_BENCH_CAP_GIB           caps the process's GPU memory (torch.cuda.set_per_process_memory_fraction),
                                  as bench/train_speed.py's --cap-gib does for the trainer
    KOHYA_BENCH_CUDNN_ATTENTION   "off": torch.backends.cuda.enable_cudnn_sdp(False), as our trainer runs Flux.1
                                  (PyTorch 2.11's cuDNN attention, its default on H100/H200, hit an illegal memory
                                  access in Flux.1's backward: bench/RESULTS.md, ninth session)
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

STUBS = Path(__file__).resolve().parent / "stubs"
STEP_BAR = "steps"  # train_network.py's tqdm(..., desc="steps")


def add_fallback_modules() -> list[str]:
    """Put bench/kohya/stubs on sys.path for each of cv2 and torchvision that does not import; the names used."""
    used = []
    for name, probe in (("cv2", "cv2"), ("torchvision", "torchvision.transforms")):
        try:
            __import__(probe)
        except Exception:  # a broken install raises more than ImportError (torchvision: RuntimeError)
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[loaded]
            used.append(name)
    if used:
        # transformers probes for these packages with importlib.util.find_spec and caches the answer: asked now,
        # before the stand-ins are reachable, it does not take them for the real packages
        from transformers.utils import import_utils

        import_utils.is_cv2_available()
        import_utils.is_torchvision_available()
        sys.path.append(str(STUBS))  # after site-packages: consulted only for what is missing there
    return used


class EventLog:
    def __init__(self, path: str):
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (open for the process's life)

    def write(self, event: str, **fields: Any) -> None:
        self.file.write(json.dumps({"event": event, **fields}) + "\n")
        self.file.flush()


def gpu_peak_gib() -> float | None:
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def hook_step_bar(log: EventLog) -> None:
    """Record the "steps" bar's creation, updates and avr_loss (see the module doc)."""
    from tqdm import std

    bar = std.tqdm
    original_init, original_update, original_postfix = bar.__init__, bar.update, bar.set_postfix

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self._bench_steps = kwargs.get("desc") == STEP_BAR
        if self._bench_steps:
            self._bench_count = 0
            log.write("loop", time=time.time(), gpu_peak_gib=gpu_peak_gib())

    def update(self: Any, n: float | None = 1) -> bool | None:
        result = original_update(self, n)
        if getattr(self, "_bench_steps", False):
            self._bench_count += 1
            log.write("step", time=time.time(), step=self._bench_count, gpu_peak_gib=gpu_peak_gib())
        return result

    def set_postfix(self: Any, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        if getattr(self, "_bench_steps", False) and "avr_loss" in kwargs:
            log.write("loss", value=float(kwargs["avr_loss"]))
        original_postfix(self, ordered_dict, refresh, **kwargs)

    bar.__init__, bar.update, bar.set_postfix = init, update, set_postfix


def patch_transformers_5() -> list[str]:
    """The transformers 5 compatibility patches of the module doc that this transformers needs; their names."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return []
    # a class property: on 4.x it would shadow the submodule that __init__ registers, hence the version test
    transformers.CLIPTextModel.text_model = property(lambda self: self)
    image_processor = transformers.CLIPImageProcessor  # resolving it can put a new lazy module in sys.modules
    sys.modules["transformers"].CLIPFeatureExtractor = image_processor
    return ["CLIPTextModel.text_model", "CLIPFeatureExtractor"]


def patch_flux_utils(t5_overrides: dict[str, Any] | None) -> list[str]:
    """Re-tie T5's embedding after sd-scripts' load_t5xxl; with ``t5_overrides``, build T5 with that config."""
    from library import flux_utils

    applied = []
    original_load = flux_utils.load_t5xxl

    def load_t5xxl(*args: Any, **kwargs: Any) -> Any:
        model = original_load(*args, **kwargs)
        if model.encoder.embed_tokens.weight is not model.shared.weight:
            model.encoder.embed_tokens.weight = model.shared.weight
        return model

    flux_utils.load_t5xxl = load_t5xxl
    applied.append("flux_utils.load_t5xxl re-ties the embedding")
    if t5_overrides:
        plain_config = flux_utils.T5Config
        flux_utils.T5Config = lambda **kwargs: plain_config(**{**kwargs, **t5_overrides})
        applied.append(f"smoke T5 config {t5_overrides}")
    return applied


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sd_scripts, script, arguments = Path(sys.argv[1]).resolve(), sys.argv[2], sys.argv[3:]
    fallbacks = add_fallback_modules()
    sys.path.insert(0, str(sd_scripts))  # as `python SCRIPT` puts the script's folder first
    import torch

    cap = float(os.environ.get("KOHYA_BENCH_CAP_GIB") or 0)
    if cap:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap * 2**30 / total)
    if os.environ.get("KOHYA_BENCH_CUDNN_ATTENTION") == "off":
        torch.backends.cuda.enable_cudnn_sdp(False)
    patches = patch_transformers_5()
    if Path(script).name.startswith("flux_"):
        overrides = os.environ.get("KOHYA_BENCH_T5_CONFIG")
        patches += patch_flux_utils(json.loads(overrides) if overrides else None)
    print(f"kohya launch: stand-ins {fallbacks or 'none'}; patches {patches or 'none'}", file=sys.stderr, flush=True)
    events = os.environ.get("KOHYA_BENCH_EVENTS")
    if events:
        hook_step_bar(EventLog(events))
    sys.argv = [str(sd_scripts / script), *arguments]
    runpy.run_path(str(sd_scripts / script), run_name="__main__")


if __name__ == "__main__":
    main()
