"""Stand-in for torchvision where the installed one cannot load (this repository's CPU test machine: PyPI's
torchvision wheels are built against CUDA PyTorch and fail to register their operators on a CPU-only torch).
The GPU machine's image has torchvision; bench/kohya/launch.py puts this folder on sys.path only when
``import torchvision.transforms`` fails.

sd-scripts uses torchvision for one thing on the bench's code path: library/train_util.py IMAGE_TRANSFORMS,
``Compose([ToTensor(), Normalize([0.5], [0.5])])``. transforms.py implements exactly that; anything else raises.
"""

IS_BENCH_STUB = True
