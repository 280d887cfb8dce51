"""Input checks shared by the CPU (OpenCV) and GPU image backends.

One definition of what an encoded image, an HWC image and a channel order are, so DecodeMat
and DecodeTensor (and the resize/colour pairs) accept and refuse exactly the same inputs
with the same messages.  Works on numpy arrays and on anything array-like with ``dtype``,
``ndim`` and ``shape`` (a cuda DeviceArray), without importing cuda.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import NO_RESULT, BackendOptions, Key, TensorSpec, option
from ..errors import ConfigError, InvalidInputError
from .imagesize import image_size

COLORS = ("rgb", "bgr")
ANY_IMAGE = TensorSpec("image", "uint8", (-1, -1, 3), layout="HWC")
ENCODED_IMAGE = TensorSpec("image", "bytes", (-1,))


def image_spec(height: int, width: int) -> TensorSpec:
    """An HWC uint8 image of a known size (what a resize stage gives)."""
    return TensorSpec("image", "uint8", (height, width, 3), layout="HWC")


def at_least_one(value: int) -> str | None:
    return None if value >= 1 else "must be at least 1 (pixels)"


# The keys the CPU and GPU image stages share, and their typed options.
RESIZE_H = Key(int, None, "output height in pixels (required)", check=at_least_one, example="224")
RESIZE_W = Key(int, None, "output width in pixels (required)", check=at_least_one, example="224")
COLOR = Key(str, None, "target channel order (required)", choices=COLORS, example='"rgb"')
# The decoders' limit on an image's size, checked from its header before decoding.
DEFAULT_MAX_PIXELS = 8192 * 8192  # 64 Mpixel: 192 MiB decoded; a 1 MB PNG can claim 400 Mpixel
MAX_PIXELS = Key(int, DEFAULT_MAX_PIXELS, "largest image decoded, in pixels (width x height); a larger one "
                 "is refused before decoding, as a NO_RESULT for that request", check=at_least_one,
                 example=str(DEFAULT_MAX_PIXELS))


@dataclass(frozen=True)
class DecodeOptions(BackendOptions):
    """DecodeMat's (and, with ``decoder``, DecodeTensor's) options."""

    max_pixels: int = option(MAX_PIXELS)


@dataclass(frozen=True)
class ResizeOptions(BackendOptions):
    """ResizeMat's and ResizeTensor's options: both required (None only before the loader's check)."""

    resize_h: int | None = option(RESIZE_H)
    resize_w: int | None = option(RESIZE_W)


@dataclass(frozen=True)
class ColorOptions(BackendOptions):
    """CvtColorMat's and CvtColorTensor's option: the channel order they give."""

    color: str | None = option(COLOR)


def refuse_oversized(item: dict[str, Any], max_pixels: int, backend: str) -> bool:
    """True (with the reason in ``item[NO_RESULT]``) when the item's encoded image must not
    be decoded: its header gives no size, or more than ``max_pixels`` pixels."""
    data = item.get("data")
    size = image_size(data) if data is not None else None
    if size is None:
        item[NO_RESULT] = (f"{backend} could not read the image's size from its header, so it did not decode it: "
                           "send a whole JPEG, PNG, BMP, GIF, WebP, TIFF, PNM, JPEG 2000 or AVIF file")
        return True
    width, height = size
    if width * height > max_pixels:
        item[NO_RESULT] = (f"{backend} refused a {width} x {height} image ({width * height} pixels): over the node's "
                           f"max_pixels = {max_pixels}; send a smaller image, or raise max_pixels in the model's config")
        return True
    return False


def channel_values(value: Any, key: str) -> tuple[float, float, float]:
    """Three per-channel numbers from ``[a, b, c]``, ``[a]``, one number, or TorchPipe's string
    form ``"a, b, c"``; one number applies to every channel."""
    numbers = _numbers(value)
    if numbers is None:
        raise ConfigError(f"{key} = {value!r} {CHANNELS_WANTED}", key=key, value=repr(value))
    return (numbers[0],) * 3 if len(numbers) == 1 else (numbers[0], numbers[1], numbers[2])


CHANNELS_WANTED = "must be 1 or 3 finite numbers, e.g. [123.675, 116.28, 103.53]"


def _numbers(value: Any) -> list[float] | None:
    parts = value.replace(",", " ").split() if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        numbers = [math.nan if isinstance(part, bool) else float(part) for part in parts]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) in (1, 3) and all(math.isfinite(n) for n in numbers) else None


def channel_check(value: Any) -> str | None:
    return None if _numbers(value) is not None else CHANNELS_WANTED


# Per-channel normalisation keys (Mat2Tensor), in the units of the values they apply to.
MEAN = Key((list, str, int, float), None, "per-channel mean, subtracted after scale, e.g. [123.675, 116.28, 103.53]",
           check=channel_check)
STD = Key((list, str, int, float), None, "per-channel std, divided by after the mean, e.g. [58.395, 57.12, 57.375]",
          check=channel_check)


def normalisation(mean: Any, std: Any, written_std: Any) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel (mean, std) from the ``mean`` and ``std`` keys (None: 0 and 1); a std of 0
    is refused, naming ``written_std`` as the config file wrote it."""
    means = channel_values(mean, "mean") if mean is not None else (0.0, 0.0, 0.0)
    stds = channel_values(std, "std") if std is not None else (1.0, 1.0, 1.0)
    if 0.0 in stds:
        raise ConfigError(f"std = {written_std!r} contains 0; every channel's std must be non-zero", key="std")
    return means, stds


def resize_size(options: ResizeOptions, backend: str) -> tuple[int, int]:
    """(height, width) from a resize node's required ``resize_h`` and ``resize_w``."""
    return (
        require_value(options.resize_h, "resize_h", backend, "resize_h = 224"),
        require_value(options.resize_w, "resize_w", backend, "resize_w = 224"),
    )


def describe(data: Any) -> str:
    """A short description of a value for error messages (never the whole payload)."""
    if hasattr(data, "dtype") and hasattr(data, "shape"):
        return f"{type(data).__name__}(dtype={data.dtype}, shape={tuple(data.shape)})"
    return type(data).__name__


def require_value(value: Any, key: str, backend: str, example: str) -> Any:
    """The value of a key the node must set; config.py fills absent keys with None."""
    if value is None:
        raise ConfigError(f"{backend} needs the config key {key!r}; add {example} to the node's config", key=key, backend=backend)
    return value


def check_encoded(data: Any, backend: str) -> None:
    """Encoded image bytes: bytes, bytearray, a contiguous memoryview or a 1-D uint8 array."""
    if isinstance(data, (bytes, bytearray)) or (isinstance(data, memoryview) and data.c_contiguous):
        return
    if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1:
        return
    raise InvalidInputError(
        f"{backend} takes encoded image bytes (bytes, bytearray, contiguous memoryview or a 1-D uint8 "
        f"array), got {describe(data)}; send the file's bytes, e.g. open(path, 'rb').read()",
        backend=backend,
        received=describe(data),
        expected="bytes",
    )


def is_hwc_image(data: Any) -> bool:
    shape: tuple[int, ...] = getattr(data, "shape", ())
    return (
        getattr(data, "dtype", None) == np.uint8
        and len(shape) == 3
        and shape[2] == 3
        and shape[0] > 0
        and shape[1] > 0
    )


def check_hwc_image(data: Any, backend: str, hint: str, types: tuple[type, ...] = (np.ndarray,)) -> Any:
    """``data`` if it is an HWC uint8 3-channel image of one of ``types``, else InvalidInputError."""
    if not (isinstance(data, types) and is_hwc_image(data)):
        raise InvalidInputError(
            f"{backend} takes an HWC uint8 image with 3 channels, got {describe(data)}; {hint}",
            backend=backend,
            received=describe(data),
            expected="uint8 (H, W, 3)",
        )
    return data


def source_color(item: dict[str, Any], backend: str) -> str:
    """The channel order an image arrives in: ``item["color"]``, "bgr" when absent."""
    color = item.get("color", "bgr")
    if color not in COLORS:
        raise InvalidInputError(
            f"{backend}: item['color'] = {color!r} is not one of {list(COLORS)}; set it to the image's "
            "channel order or leave it out for bgr",
            backend=backend,
            received=repr(color),
            expected=list(COLORS),
        )
    return color
