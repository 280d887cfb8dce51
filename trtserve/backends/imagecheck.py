"""Input checks shared by the CPU (OpenCV) and GPU image backends.

One definition of what an encoded image, an HWC image and a channel order are, so DecodeMat
and DecodeTensor (and the resize/colour pairs) accept and refuse exactly the same inputs
with the same messages.  Works on numpy arrays and on anything array-like with ``dtype``,
``ndim`` and ``shape`` (a cuda DeviceArray), without importing cuda.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import Key, TensorSpec
from ..errors import ConfigError, InvalidInputError

COLORS = ("rgb", "bgr")
ANY_IMAGE = TensorSpec("image", "uint8", (-1, -1, 3))
ENCODED_IMAGE = TensorSpec("image", "bytes", (-1,))


def at_least_one(value: int) -> str | None:
    return None if value >= 1 else "must be at least 1 (pixels)"


# ResizeMat's and ResizeTensor's keys, and how both read them.
RESIZE_KEYS = {
    "resize_h": Key(int, None, "output height in pixels (required)", check=at_least_one),
    "resize_w": Key(int, None, "output width in pixels (required)", check=at_least_one),
}


def resize_size(config: dict[str, Any], backend: str) -> tuple[int, int]:
    """(height, width) from a resize node's required ``resize_h`` and ``resize_w``."""
    return (
        require_key(config, "resize_h", backend, "resize_h = 224"),
        require_key(config, "resize_w", backend, "resize_w = 224"),
    )


def describe(data: Any) -> str:
    """A short description of a value for error messages (never the whole payload)."""
    if hasattr(data, "dtype") and hasattr(data, "shape"):
        return f"{type(data).__name__}(dtype={data.dtype}, shape={tuple(data.shape)})"
    return type(data).__name__


def require_key(config: dict[str, Any], key: str, backend: str, example: str) -> Any:
    """A key the node must set; config.py fills absent keys with None."""
    value = config.get(key)
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
    shape = getattr(data, "shape", ())
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
