"""CPU image backends on OpenCV: DecodeMat, ResizeMat, CvtColorMat (TorchPipe's names).
Mat2Tensor (tensor.py) turns their image into a model's float tensor.

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

from ..backend import Backend, InstanceContext, TensorSpec
from .imagecheck import (
    ANY_IMAGE,
    ENCODED_IMAGE,
    ColorOptions,
    DecodeOptions,
    ResizeOptions,
    check_encoded,
    check_hwc_image,
    image_spec,
    refuse_oversized,
    require_value,
    resize_size,
    source_color,
)

def check_image(item: dict[str, Any], backend: str) -> np.ndarray:
    """The item's data as an HWC uint8 3-channel numpy image, or InvalidInputError saying why not."""
    return check_hwc_image(
        item.get("data"), backend, "decode images with DecodeMat first, or send np.uint8 data shaped (height, width, 3)"
    )


class _ImageBackend(Backend):
    """Shared by the three: one image per item, whatever its first dimension."""

    def request_size(self, item: dict[str, Any]) -> int:
        return 1


class DecodeMat(_ImageBackend):
    """Encoded image bytes (JPEG, PNG, ...) -> BGR HWC uint8; sets ``item["color"] = "bgr"``.

    The image's size is read from its header first: one over ``max_pixels`` (or whose size
    cannot be read) is not decoded, a soft failure saying why (``item[NO_RESULT]``)."""

    Options = DecodeOptions

    def init(self, context: InstanceContext) -> None:
        super().init(context)
        self.max_pixels = context.options(DecodeOptions).max_pixels

    def validate(self, item: dict[str, Any]) -> None:
        check_encoded(item.get("data"), "DecodeMat")

    def forward(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            if refuse_oversized(item, self.max_pixels, "DecodeMat"):
                continue
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
        return [ENCODED_IMAGE], [ANY_IMAGE]


class ResizeMat(_ImageBackend):
    """Resize to ``resize_h`` x ``resize_w`` with bilinear interpolation (cv2.INTER_LINEAR)."""

    Options = ResizeOptions
    required_keys = ("resize_h", "resize_w")

    def init(self, context: InstanceContext) -> None:
        super().init(context)
        self.height, self.width = resize_size(context.options(ResizeOptions), "ResizeMat")

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
        return [ANY_IMAGE], [image_spec(self.height, self.width)]


class CvtColorMat(_ImageBackend):
    """Reorder channels to ``color`` ("rgb" or "bgr") from ``item["color"]`` (default "bgr")."""

    Options = ColorOptions
    required_keys = ("color",)

    def init(self, context: InstanceContext) -> None:
        super().init(context)
        self.color = require_value(context.options(ColorOptions).color, "color", "CvtColorMat", 'color = "rgb"')

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
        return source_color(item, "CvtColorMat")

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [ANY_IMAGE], [ANY_IMAGE]

    def produces(self, given: list[TensorSpec] | None) -> list[TensorSpec] | None:
        return given or [ANY_IMAGE]  # the same image, channels reordered
