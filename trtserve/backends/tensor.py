"""Mat2Tensor: the last CPU image stage, an HWC uint8 image -> a normalised float32 tensor.

TorchPipe's name for turning an OpenCV image into a tensor.  One fused pass per image::

    result = (image * scale - mean) / std        per channel, in float32
    result = result.transpose(2, 0, 1)           layout = "CHW" (the default); "HWC" keeps it

``mean`` and ``std`` are per channel in the image's channel order (after CvtColorMat), in
the units after ``scale``: ImageNet's statistics are ``mean = [123.675, 116.28, 103.53]``,
``std = [58.395, 57.12, 57.375]`` with ``scale = 1`` (0-255 units, as FusedPreprocessTensor
takes them), or ``[0.485, 0.456, 0.406]`` / ``[0.229, 0.224, 0.225]`` with
``scale = 0.00392156862745098`` (1/255, PaddlePaddle's convention).

The result is one sample, (3, H, W), without a batch dimension: a model backend (OnnxRuntime,
TorchScriptTensor with ``add_batch_dim``) stacks the samples of a batch itself and hands
each result back without the batch dimension.  Each item counts 1 toward ``max``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import Backend, BackendOptions, InstanceContext, Key, TensorSpec, option
from .imagecheck import ANY_IMAGE, MEAN, STD, check_hwc_image, normalisation

LAYOUTS = ("CHW", "HWC")


def _finite(value: float) -> str | None:
    return None if np.isfinite(value) and value != 0 else "must be a finite, non-zero number"


Channels = tuple[float, ...] | str | int | float | None  # 1 or 3 numbers, as config.py checked them


@dataclass(frozen=True)
class Mat2TensorOptions(BackendOptions):
    scale: int | float = option(
        Key((int, float), 1, "multiplier applied first, e.g. 0.00392156862745098 (1/255)", check=_finite)
    )
    mean: Channels = option(MEAN)
    std: Channels = option(STD)
    layout: str = option(Key(str, "CHW", "CHW: (3, H, W), as NCHW models take it; HWC keeps (H, W, 3)", choices=LAYOUTS))


class Mat2Tensor(Backend):
    Options = Mat2TensorOptions

    def init(self, context: InstanceContext) -> None:
        super().init(context)
        options = context.options(Mat2TensorOptions)
        scale = float(options.scale)
        mean, std = normalisation(options.mean, options.std, context.config.get("std"))
        # (x * scale - mean) / std == x * gain - offset: two passes over the image, not three.
        self.gain = np.array([scale / s for s in std], np.float32)
        self.offset = np.array([m / s for m, s in zip(mean, std)], np.float32)
        self.identity = scale == 1 and mean == (0.0, 0.0, 0.0) and std == (1.0, 1.0, 1.0)
        self.chw = options.layout == "CHW"

    def request_size(self, item: dict[str, Any]) -> int:
        return 1  # one image, whatever its height

    def validate(self, item: dict[str, Any]) -> None:
        _image(item)

    def forward(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            # Checked here too: inside S[...] only the first stage's validate runs before queueing.
            item["result"] = self.convert(_image(item))

    def convert(self, image: np.ndarray) -> np.ndarray:
        """One HWC uint8 image -> float32, normalised, in the configured layout."""
        if self.chw:
            # Channel by channel straight into the CHW result: no HWC float temporary and no
            # transposing copy (each channel is one strided read, one contiguous write).
            out = np.empty((image.shape[2], image.shape[0], image.shape[1]), np.float32)
            for channel in range(image.shape[2]):
                plane = out[channel]
                np.multiply(image[:, :, channel], self.gain[channel], out=plane, dtype=np.float32)
                if not self.identity:
                    plane -= self.offset[channel]
            return out
        out = image.astype(np.float32)
        if not self.identity:
            out *= self.gain
            out -= self.offset
        return out

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [ANY_IMAGE], self._output(-1, -1)

    def produces(self, given: list[TensorSpec] | None) -> list[TensorSpec] | None:
        if given and len(given) == 1 and len(given[0].shape) == 3:
            height, width, _ = given[0].shape
            return self._output(height, width)
        return self._output(-1, -1)

    def _output(self, height: int, width: int) -> list[TensorSpec]:
        if self.chw:
            return [TensorSpec("tensor", "float32", (3, height, width), layout="CHW")]
        return [TensorSpec("tensor", "float32", (height, width, 3), layout="HWC")]


def _image(item: dict[str, Any]) -> np.ndarray:
    return check_hwc_image(
        item.get("data"), "Mat2Tensor", "put DecodeMat (and ResizeMat, CvtColorMat) before it, or send np.uint8 data shaped (height, width, 3)"
    )
