"""Stand-in for OpenCV (opencv-python, about 50 MB: over the device call's carry budget) for kohya sd-scripts runs
in bench/kohya_speed.py.

sd-scripts imports cv2 at the top of library/train_util.py and library/utils.py, but calls it only to resize an
image whose size differs from its bucket (library/utils.py resize_image with the "area" interpolation), for
color_aug, and for its dataset debugger. The bench's images have exactly their bucket's size and no augmentation
is configured, so none of that runs. Any use of this module raises, naming what was asked for: a run that needs
OpenCV fails loudly rather than computing something else.

bench/kohya/launch.py puts this folder on sys.path only when the real cv2 does not import.
"""

from __future__ import annotations

from typing import NoReturn

IS_BENCH_STUB = True


def __getattr__(name: str) -> NoReturn:
    raise RuntimeError(
        f"cv2.{name}: OpenCV is not installed here; bench/kohya/stubs/cv2 only lets sd-scripts import. "
        "The run needed OpenCV (an image resized to its bucket, color_aug or the dataset debugger): "
        "install opencv-python-headless or give the images their bucket's exact size"
    )
