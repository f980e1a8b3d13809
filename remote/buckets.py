"""kohya's aspect-ratio bucketing and step counting (library/train_util.py BucketManager, model_util).

Pure Python, so `rentrain check` counts steps on the laptop exactly as the trainer will run them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from pydantic import BaseModel

Size = tuple[int, int]  # (width, height)


class BucketChoice(BaseModel):
    bucket: Size
    resized: Size  # the size the image is scaled to before the centre crop down to `bucket`


class StepPlan(BaseModel):
    bucket_samples: dict[str, int]  # "WxH" -> images x repeats in that bucket
    samples_per_epoch: int
    batches_per_epoch: int
    steps_per_epoch: int  # optimizer steps (after gradient accumulation)
    epochs: int
    total_steps: int


def make_bucket_resolutions(resolution: Size, min_size: int, max_size: int, step: int) -> list[Size]:
    """The predefined buckets: area <= resolution's area, sides multiples of `step` in [min, max]."""
    max_area = resolution[0] * resolution[1]
    square = int(math.sqrt(max_area) // step) * step
    buckets: set[Size] = {(square, square)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // step) * step)
        if height >= min_size:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


class BucketPlanner:
    """Assigns each image size to its bucket, as kohya's BucketManager does."""

    def __init__(
        self,
        resolution: Size,
        enable_bucket: bool,
        min_bucket_reso: int = 256,
        max_bucket_reso: int = 1024,
        bucket_reso_steps: int = 64,
        bucket_no_upscale: bool = False,
    ):
        self.step = bucket_reso_steps
        self.max_area = resolution[0] * resolution[1]
        self.no_upscale = enable_bucket and bucket_no_upscale
        if not enable_bucket:
            self.buckets = [resolution]
        elif self.no_upscale:
            self.buckets = []
        else:
            min_size = min_bucket_reso - min_bucket_reso % self.step
            max_size = max_bucket_reso + (-max_bucket_reso) % self.step
            self.buckets = make_bucket_resolutions(resolution, min_size, max_size, self.step)
        self._bucket_set = set(self.buckets)

    def assign(self, width: int, height: int) -> BucketChoice:
        aspect = width / height
        if not self.no_upscale:
            if (width, height) in self._bucket_set:
                bucket = (width, height)
            else:
                bucket = min(self.buckets, key=lambda b: abs(b[0] / b[1] - aspect))
            scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
            return BucketChoice(bucket=bucket, resized=resized)
        resized = self._no_upscale_size(width, height, aspect)
        bucket = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
        return BucketChoice(bucket=bucket, resized=resized)

    def _round(self, value: float) -> int:
        rounded = int(value + 0.5)
        return rounded - rounded % self.step

    def _no_upscale_size(self, width: int, height: int, aspect: float) -> Size:
        if width * height <= self.max_area:
            return (width, height)
        resized_width = math.sqrt(self.max_area * aspect)
        resized_height = self.max_area / resized_width
        width_rounded = self._round(resized_width)
        height_for_width = self._round(width_rounded / aspect)
        aspect_from_width = width_rounded / height_for_width
        height_rounded = self._round(resized_height)
        width_for_height = self._round(height_rounded * aspect)
        aspect_from_height = width_for_height / height_rounded
        if abs(aspect_from_width - aspect) < abs(aspect_from_height - aspect):
            return (width_rounded, int(width_rounded / aspect + 0.5))
        return (int(height_rounded * aspect + 0.5), height_rounded)


def plan_steps(
    bucket_of_each_sample: Iterable[Size],
    batch_size: int,
    gradient_accumulation_steps: int = 1,
    max_train_epochs: int | None = None,
    max_train_steps: int | None = None,
    processes: int = 1,
) -> StepPlan:
    """Count steps as kohya does: batches never mix buckets; epochs win over max_train_steps.

    `bucket_of_each_sample` yields one bucket per image per repeat. With several data-parallel
    processes, each optimizer step takes gradient_accumulation_steps batches per process.
    """
    counts = Counter(bucket_of_each_sample)
    batches = sum(math.ceil(n / batch_size) for n in counts.values())
    steps_per_epoch = math.ceil(batches / (gradient_accumulation_steps * processes))
    if max_train_epochs is not None:
        epochs = max_train_epochs
        total = epochs * steps_per_epoch
    elif max_train_steps is not None:
        total = max_train_steps
        epochs = math.ceil(total / steps_per_epoch) if steps_per_epoch else 0
    else:
        raise ValueError("set max_train_epochs or max_train_steps")
    return StepPlan(
        bucket_samples={f"{w}x{h}": n for (w, h), n in sorted(counts.items())},
        samples_per_epoch=sum(counts.values()),
        batches_per_epoch=batches,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        total_steps=total,
    )
