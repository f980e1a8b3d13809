"""torchvision.transforms' Compose, ToTensor and Normalize for sd-scripts' IMAGE_TRANSFORMS (see __init__.py);
the rest raises."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import numpy as np
import torch


class Compose:
    def __init__(self, transforms: Sequence[Callable[[Any], Any]]):
        self.transforms = list(transforms)

    def __call__(self, value: Any) -> Any:
        for transform in self.transforms:
            value = transform(value)
        return value


class ToTensor:
    """An HxWxC uint8 array or PIL image -> a CxHxW float tensor in [0, 1], as torchvision's."""

    def __call__(self, picture: Any) -> torch.Tensor:
        array = np.asarray(picture)
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return tensor.float().div(255) if tensor.dtype == torch.uint8 else tensor.float()


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - self.mean) / self.std


def __getattr__(name: str) -> NoReturn:
    raise RuntimeError(f"torchvision.transforms.{name}: not in bench/kohya/stubs/torchvision (install torchvision)")
