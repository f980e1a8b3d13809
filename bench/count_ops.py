"""How many operations (about one GPU kernel each) one training step launches, without a GPU.

    python bench/count_ops.py [--unet-only] [--plain]

Builds the full-size SD 1.5 UNet and CLIP text encoder on PyTorch's meta device (shapes only, no memory,
no arithmetic), puts the trainer's LoRA on them (dim 32, kohya's module set, flat buffers and fused layers
as the trainer does; --plain: the plain LoRA), and runs the forward and backward of one 512px batch-4 step
in bf16 under a dispatch hook that counts the ATen operations reaching the backend, by where they come
from. View and metadata operations (no kernel) are left out. The count approximates the kernels of one
CUDA-graph replay; bench/profile_step.py measures the real kernels and their time on a GPU.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NO_KERNEL = {
    "view",
    "_unsafe_view",
    "reshape",
    "t",
    "transpose",
    "permute",
    "expand",
    "detach",
    "alias",
    "as_strided",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "_reshape_alias",
    "empty",
    "empty_like",
    "empty_strided",
    "lift_fresh",
    "unflatten",
    "flatten",
    "contiguous",
    "numpy_T",
    "is_same_size",
    "_has_compatible_shallow_copy_type",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "dim",
}


def count(unet_only: bool, plain: bool, where: str | None = None) -> tuple[Counter, Counter, Counter]:
    import traceback

    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import CLIPTextConfig, CLIPTextModel

    import remote.trainer.lora as lora_mod
    from bench.train_speed import CLIP_L, SD15_UNET
    from remote.trainer.lora import LoRANetwork

    if plain:
        lora_mod.is_fusable = lambda module: False

    class Counting(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: Counter = Counter()
            self.sources: Counter = Counter()
            self.phase = "?"

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in NO_KERNEL:
                self.ops[(self.phase, name)] += 1
            if name == where:  # the innermost frame outside torch: which line of which library asked
                frames = [
                    f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and f.filename != __file__
                ]
                source = (
                    f"{frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno}" if frames else "autograd"
                )
                self.sources[(self.phase, source)] += 1
            return func(*args, **(kwargs or {}))

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET).to(torch.bfloat16)
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L)).to(torch.bfloat16)
        unet.requires_grad_(False)
        text.requires_grad_(False)
        network = LoRANetwork(unet, [] if unet_only else [text], "sd15", 32, 16)
        network.apply_to()
        network.to("meta", torch.float32)
        network.use_flat_buffers(torch.bfloat16)
        latents = torch.randn(4, 4, 64, 64, dtype=torch.bfloat16)
        ids = torch.randint(0, 49408, (4, 77))
        timesteps = torch.randint(0, 1000, (4,))
        counter = Counting()
        with counter:
            counter.phase = "flat buffers"
            network.flat.begin_micro_batch()
            if unet_only:
                context = torch.randn(4, 77, 768, dtype=torch.bfloat16)
            else:
                counter.phase = "text encoder forward"
                context = text(ids).last_hidden_state
            counter.phase = "UNet forward"
            prediction = unet(latents, timesteps, encoder_hidden_states=context).sample
            counter.phase = "loss"
            loss = F.mse_loss(prediction.float(), latents.float())
            counter.phase = "backward"
            loss.backward()
            counter.phase = "flat buffers"
            network.flat.end_micro_batch()
    by_phase: Counter = Counter()
    by_op: Counter = Counter()
    for (phase, name), n in counter.ops.items():
        by_phase[phase] += n
        by_op[name] += n
    return by_phase, by_op, counter.sources


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet-only", action="store_true")
    parser.add_argument("--plain", action="store_true", help="the LoRA computed the plain way (no fused layers)")
    parser.add_argument("--where", metavar="OP", help="also list the source lines that issue this operation")
    args = parser.parse_args()
    by_phase, by_op, sources = count(args.unet_only, args.plain, args.where)
    label = (
        f"SD 1.5 512px b4, {'UNet only' if args.unet_only else 'UNet+TE'}, {'plain' if args.plain else 'fused'} LoRA"
    )
    print(f"{label}: {sum(by_phase.values())} operations per step (forward + backward, optimizer not included)")
    print("| part | operations |\n|---|---|")
    for phase, n in by_phase.most_common():
        print(f"| {phase} | {n} |")
    print("\n| operation | count |\n|---|---|")
    for name, n in by_op.most_common(15):
        print(f"| {name} | {n} |")
    if args.where:
        print(f"\n| {args.where}: phase | source | count |\n|---|---|---|")
        for (phase, source), n in sources.most_common(12):
            print(f"| {phase} | {source} | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
