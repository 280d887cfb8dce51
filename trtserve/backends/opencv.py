"""CPU image backends on OpenCV: DecodeMat, ResizeMat, CvtColorMat (TorchPipe's names).

Images travel between stages as HWC uint8 numpy arrays with 3 channels; ``item["color"]``
records the channel order ("bgr" after decoding, as OpenCV produces it).  Each item is one
image, so ``request_size`` is 1 whatever the image's height.

Bad image *bytes* are a soft failure (the item leaves with no ``result``), because a
corrupt upload is a property of one request, not a fault of the node.  A wrong *type* of
input (a str, a float image) is the caller's mistake and is refused before queueing with
InvalidInputError.
"""
from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from ..backend import Backend, Key, TensorSpec
from ..errors import ConfigError, InvalidInputError

COLORS = ("rgb", "bgr")
_ANY_IMAGE = TensorSpec("image", "uint8", (-1, -1, 3))


def _at_least_one(value: int) -> str | None:
    return None if value >= 1 else "must be at least 1 (pixels)"


def _describe(data: Any) -> str:
    """A short description of a value for error messages (never the whole payload)."""
    if isinstance(data, np.ndarray):
        return f"ndarray(dtype={data.dtype}, shape={tuple(data.shape)})"
    return type(data).__name__


def _require(config: dict[str, Any], key: str, backend: str, example: str) -> Any:
    """A key the node must set; config.py fills absent keys with None."""
    value = config.get(key)
    if value is None:
        raise ConfigError(
            f"{backend} needs the config key {key!r}; add {example} to the node's config",
            key=key,
            backend=backend,
        )
    return value


def check_image(item: dict[str, Any], backend: str) -> np.ndarray:
    """The item's data as an HWC uint8 3-channel image, or InvalidInputError saying why not."""
    data = item.get("data")
    ok = (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 3
        and data.shape[2] == 3
        and data.shape[0] > 0
        and data.shape[1] > 0
    )
    if not ok:
        raise InvalidInputError(
            f"{backend} takes an HWC uint8 image with 3 channels, got {_describe(data)}; "
            "decode images with DecodeMat first, or send np.uint8 data shaped (height, width, 3)",
            backend=backend,
            received=_describe(data),
            expected="uint8 (H, W, 3)",
        )
    return data


class _ImageBackend(Backend):
    """Shared by the three: one image per item, whatever its first dimension."""

    def request_size(self, item: dict[str, Any]) -> int:
        return 1


class DecodeMat(_ImageBackend):
    """Encoded image bytes (JPEG, PNG, ...) -> BGR HWC uint8; sets ``item["color"] = "bgr"``."""

    def validate(self, item: dict[str, Any]) -> None:
        data = item.get("data")
        if isinstance(data, (bytes, bytearray)):
            return
        if isinstance(data, memoryview) and data.c_contiguous:
            return
        if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 1:
            return
        raise InvalidInputError(
            f"DecodeMat takes encoded image bytes (bytes, bytearray, contiguous memoryview or a 1-D "
            f"uint8 array), got {_describe(data)}; send the file's bytes, e.g. open(path, 'rb').read()",
            backend="DecodeMat",
            received=_describe(data),
            expected="bytes",
        )

    def forward(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            image = self.decode(item.get("data"))
            if image is not None:
                item["result"] = image
                item["color"] = "bgr"

    @staticmethod
    def decode(data: Any) -> np.ndarray | None:
        """The decoded BGR image, or None for empty or undecodable bytes (a soft failure)."""
        buffer = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        if buffer.size == 0:
            return None  # cv2.imdecode asserts on an empty buffer instead of returning None
        try:
            image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        except cv2.error:  # some truncated files trip decoder assertions rather than return None
            return None
        if image is None or image.ndim != 3 or image.shape[2] != 3:
            return None
        return image

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [TensorSpec("image", "bytes", (-1,))], [_ANY_IMAGE]


class ResizeMat(_ImageBackend):
    """Resize to ``resize_h`` x ``resize_w`` with bilinear interpolation (cv2.INTER_LINEAR)."""

    config_keys = {
        "resize_h": Key(int, None, "output height in pixels (required)", check=_at_least_one),
        "resize_w": Key(int, None, "output width in pixels (required)", check=_at_least_one),
    }

    def init(self, config: dict[str, Any], kwargs: dict[str, Any]) -> None:
        super().init(config, kwargs)
        self.height = _require(config, "resize_h", "ResizeMat", "resize_h = 224")
        self.width = _require(config, "resize_w", "ResizeMat", "resize_w = 224")

    def validate(self, item: dict[str, Any]) -> None:
        check_image(item, "ResizeMat")

    def forward(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            # Checked here too: inside S[...] only the first stage's validate runs before queueing.
            image = check_image(item, "ResizeMat")
            if image.shape[:2] == (self.height, self.width):
                item["result"] = image  # already the right size: skip a copy
            else:
                item["result"] = cv2.resize(image, (self.width, self.height), interpolation=cv2.INTER_LINEAR)

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [_ANY_IMAGE], [TensorSpec("image", "uint8", (self.height, self.width, 3))]


class CvtColorMat(_ImageBackend):
    """Reorder channels to ``color`` ("rgb" or "bgr") from ``item["color"]`` (default "bgr")."""

    config_keys = {"color": Key(str, None, "target channel order (required)", choices=COLORS)}

    def init(self, config: dict[str, Any], kwargs: dict[str, Any]) -> None:
        super().init(config, kwargs)
        self.color = _require(config, "color", "CvtColorMat", 'color = "rgb"')

    def validate(self, item: dict[str, Any]) -> None:
        check_image(item, "CvtColorMat")
        self.source_color(item)

    def forward(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            image = check_image(item, "CvtColorMat")
            if self.source_color(item) == self.color:
                item["result"] = image
            else:  # rgb <-> bgr is the same channel swap either way
                item["result"] = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            item["color"] = self.color

    @staticmethod
    def source_color(item: dict[str, Any]) -> str:
        color = item.get("color", "bgr")
        if color not in COLORS:
            raise InvalidInputError(
                f"CvtColorMat: item['color'] = {color!r} is not one of {list(COLORS)}; "
                "set it to the image's channel order or leave it out for bgr",
                backend="CvtColorMat",
                received=repr(color),
                expected=list(COLORS),
            )
        return color

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [_ANY_IMAGE], [_ANY_IMAGE]
