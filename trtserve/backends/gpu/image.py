"""GPU image backends: DecodeTensor, ResizeTensor, CvtColorTensor, FusedPreprocessTensor.

They mirror the CPU DecodeMat / ResizeMat / CvtColorMat (same keys, same results within
1 LSB) but keep images on the GPU: between stages ``data``/``result`` is an HWC uint8
:class:`~trtserve.cuda.DeviceArray` and ``item["color"]`` records the channel order.
FusedPreprocessTensor ends the chain with the [1, 3, H, W] float32 tensor a model node
consumes directly.

Every kernel is enqueued on ``current_stream()``, the instance stream SyncTensor binds, and
nothing here waits for the device: wrap the chain as ``SyncTensor[S[DecodeTensor, ...]]``.
Each item is one image, so ``request_size`` is 1.

Decoding: with nvImageCodec installed (``from nvidia import nvimgcodec``) DecodeTensor
decodes on the GPU (RGB output, so ``color`` becomes "rgb"), copies each image into an
array of its own on the instance stream and waits for that stream once per batch before
letting nvImageCodec's images go: a result must not depend on nvImageCodec's decoder,
which goes away with its model, so a result read after its model closed would read freed
device memory and crash the process.  This is the one wait nothing else in the chain has.
Otherwise it decodes with
``cv2.imdecode`` on the instance thread (the GIL is released) and uploads through the
instance's pinned staging buffer, asynchronously on the stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from ...backend import Backend, BackendOptions, InstanceContext, Key, TensorSpec, option
from ...cuda import DeviceArray, HostStaging, copy_async, current_stream
from ...errors import ConfigError, ModelUnavailableError
from ..imagecheck import (
    ANY_IMAGE,
    COLORS,
    ENCODED_IMAGE,
    MAX_PIXELS,
    RESIZE_H,
    RESIZE_W,
    ColorOptions,
    ResizeOptions,
    channel_check,
    check_encoded,
    check_hwc_image,
    refuse_oversized,
    normalisation,
    require_value,
    resize_size,
    source_color,
)
from . import kernels

@dataclass(frozen=True)
class DecodeTensorOptions(BackendOptions):
    decoder: str = option(
        Key(str, "auto", "auto: nvImageCodec when installed, else OpenCV on the host", choices=("auto", "nvimgcodec", "opencv"))
    )
    max_pixels: int = option(MAX_PIXELS)


@dataclass(frozen=True)
class FusedPreprocessOptions(BackendOptions):
    resize_h: int | None = option(RESIZE_H)
    resize_w: int | None = option(RESIZE_W)
    color: str | None = option(Key(str, None, "target channel order (required for CvtColor*, optional here)", choices=COLORS))
    mean: Any = option(Key((list, str, int, float), None, "per-channel mean in 0-255 units, e.g. [123.675, 116.28, 103.53]",
                           check=channel_check))
    std: Any = option(Key((list, str, int, float), None, "per-channel std in 0-255 units, e.g. [58.395, 57.12, 57.375]",
                          check=channel_check))


class _GpuImage(Backend):
    """Shared: one image per item; needs the instance stream; uploads host images itself."""

    kernel_names: tuple[str, ...] = ()  # compiled at init
    thread_bound = True  # launches on the instance's current stream

    def init(self, context: InstanceContext) -> None:
        super().init(context)
        name = type(self).__name__
        stream = current_stream()
        if stream is None:
            raise ConfigError(
                f"{name} enqueues GPU work on the instance's CUDA stream, and none is bound: "
                f"wrap the chain in SyncTensor, e.g. backend = \"SyncTensor[S[DecodeTensor,{name}]]\"",
                backend=name,
            )
        self.device = stream.device
        self.staging: HostStaging | None = None
        for kernel_name in self.kernel_names:  # compile at load, not on the first request
            kernels.kernel(kernel_name, self.device)

    def request_size(self, item: dict[str, Any]) -> int:
        return 1

    def validate(self, item: dict[str, Any]) -> None:
        self.image(item)

    def image(self, item: dict[str, Any]) -> DeviceArray | np.ndarray:
        hint = "decode images with DecodeTensor first"
        return check_hwc_image(item.get("data"), type(self).__name__, hint, types=(np.ndarray, DeviceArray))

    def device_images(self, items: list[dict[str, Any]]) -> list[DeviceArray]:
        """Every item's image on the device; host images go up in one staged upload."""
        images = [self.image(item) for item in items]
        host = [img for img in images if isinstance(img, np.ndarray)]
        uploaded = iter(self._upload(host) if host else ())
        return [img if isinstance(img, DeviceArray) else next(uploaded) for img in images]

    def _upload(self, host: list[np.ndarray]) -> list[DeviceArray]:
        if self.staging is None:
            self.staging = HostStaging(device=self.device)
        return self.staging.upload(host)

    def close(self) -> None:
        if self.staging is not None:
            self.staging.close()
        super().close()


def hardware_decoder(nvimgcodec: Any, device: int) -> Any | None:
    """nvImageCodec's decoder on the GPU's hardware JPEG engines (A100, H100, ...), or None
    where the GPU has none.  Batched, it decodes several times faster than the general
    decoder, which does not use the engines for a batch; a test image proves it works."""
    try:
        decoder = nvimgcodec.Decoder(device_id=device, backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)])
        ok, probe = cv2.imencode(".jpg", np.full((64, 64, 3), 128, np.uint8))
        decoded = decoder.decode([probe.tobytes()])
    except Exception:  # no such backend in this release, or no engine on this GPU
        return None
    return decoder if ok and decoded and decoded[0] is not None else None


def decode_batch(decoder: Any, sources: list[bytes], params: Any, stream: int) -> list[Any]:
    """One decode call for the batch; None where an image could not be decoded."""
    try:
        return list(decoder.decode(sources, params=params, cuda_stream=stream))
    except Exception:  # one bad image can fail the batch call: isolate it per image
        images = []
        for source in sources:
            try:
                images.append(decoder.decode(source, params=params, cuda_stream=stream))
            except Exception:
                images.append(None)
        return images


class DecodeTensor(_GpuImage):
    """Encoded image bytes -> HWC uint8 DeviceArray; sets ``item["color"]``.

    Undecodable bytes, and images over ``max_pixels`` (read from the header, before any
    decoding), are a soft failure (no ``result``), as in DecodeMat.
    """

    Options = DecodeTensorOptions

    def init(self, context: InstanceContext) -> None:
        super().init(context)
        options = context.options(DecodeTensorOptions)
        self.max_pixels = options.max_pixels
        choice = options.decoder
        self.nvimgcodec = None
        if choice in ("auto", "nvimgcodec"):
            try:
                from nvidia import nvimgcodec
            except ImportError:
                if choice == "nvimgcodec":
                    raise ModelUnavailableError(
                        "DecodeTensor: decoder = \"nvimgcodec\" but nvImageCodec is not installed; "
                        "pip install nvidia-nvimgcodec-cu12 (or -cu13), or use decoder = \"auto\"",
                        backend="DecodeTensor",
                    ) from None
            else:
                self.nvimgcodec = nvimgcodec
                self.fallback = nvimgcodec.Decoder(device_id=self.device)
                self.decoder = hardware_decoder(nvimgcodec, self.device) or self.fallback
                # Interleaved 8-bit RGB: ColorSpec.RGB in older nvImageCodec releases, SRGB
                # in newer ones (0.9 has only SRGB).
                self.rgb = getattr(nvimgcodec.ColorSpec, "RGB", None) or nvimgcodec.ColorSpec.SRGB
        if self.nvimgcodec is None:
            from ..opencv import DecodeMat

            self.host_decode = DecodeMat.decode
            self.staging = HostStaging(device=self.device)

    def validate(self, item: dict[str, Any]) -> None:
        check_encoded(item.get("data"), "DecodeTensor")

    def forward(self, items: list[dict[str, Any]]) -> None:
        items = [item for item in items if not refuse_oversized(item, self.max_pixels, "DecodeTensor")]
        if not items:
            return
        if self.nvimgcodec is not None:
            self._forward_nvimgcodec(items, self.nvimgcodec)
            return
        staging = self.staging
        assert staging is not None, "init creates the staging buffer when it decodes on the host"
        decoded = [(item, self.host_decode(item.get("data"))) for item in items]
        good = [(item, image) for item, image in decoded if image is not None]
        if not good:
            return
        uploaded = staging.upload([image for _, image in good])
        for (item, _), image in zip(good, uploaded):
            item["result"] = image
            item["color"] = "bgr"

    def _forward_nvimgcodec(self, items: list[dict[str, Any]], nvimgcodec: Any) -> None:
        stream = current_stream()
        assert stream is not None, "init refuses to load without the instance's stream"
        sources = [bytes(item["data"]) for item in items]  # refuse_oversized dropped items without data
        params = nvimgcodec.DecodeParams(color_spec=self.rgb)
        images = decode_batch(self.decoder, sources, params, stream.handle)
        missed = [i for i, image in enumerate(images) if image is None]
        if missed and self.decoder is not self.fallback:
            # What the hardware decoder refuses (progressive JPEG, a PNG, ...) goes to the
            # general decoder, still in one call.
            retried = decode_batch(self.fallback, [sources[i] for i in missed], params, stream.handle)
            for i, image in zip(missed, retried):
                images[i] = image
        for item, image in zip(items, images):
            if image is None:
                continue  # undecodable: soft failure, as DecodeMat
            decoded = DeviceArray.from_cuda_array(image, stream)  # checks C-contiguity
            if decoded.ndim == 3 and decoded.shape[2] == 3 and decoded.dtype == np.uint8:
                own = DeviceArray.empty(decoded.shape, np.uint8, stream)
                copy_async(own.ptr, decoded.ptr, decoded.nbytes, "dtod", stream)
                item["result"] = own
                item["color"] = "rgb"
        stream.synchronize()  # the copies are done: nvImageCodec's images may go now
        del images

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [ENCODED_IMAGE], [ANY_IMAGE]


class ResizeTensor(_GpuImage):
    """Bilinear resize to ``resize_h`` x ``resize_w`` (OpenCV INTER_LINEAR within 1 LSB)."""

    kernel_names = ("resize_linear_u8",)
    Options = ResizeOptions

    def init(self, context: InstanceContext) -> None:
        super().init(context)
        self.height, self.width = resize_size(context.options(ResizeOptions), "ResizeTensor")

    def forward(self, items: list[dict[str, Any]]) -> None:
        for item, image in zip(items, self.device_images(items)):
            if image.shape[:2] == (self.height, self.width):
                item["result"] = image  # already that size: no copy, as ResizeMat
            else:
                item["result"] = kernels.resize_u8(image, self.height, self.width)

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [ANY_IMAGE], [TensorSpec("image", "uint8", (self.height, self.width, 3))]


class CvtColorTensor(_GpuImage):
    """Reorder channels to ``color`` ("rgb"/"bgr") from ``item["color"]`` (default "bgr")."""

    kernel_names = ("swap_rb_u8",)
    Options = ColorOptions

    def init(self, context: InstanceContext) -> None:
        super().init(context)
        self.color = require_value(context.options(ColorOptions).color, "color", "CvtColorTensor", 'color = "rgb"')

    def validate(self, item: dict[str, Any]) -> None:
        super().validate(item)
        source_color(item, "CvtColorTensor")

    def forward(self, items: list[dict[str, Any]]) -> None:
        for item, image in zip(items, self.device_images(items)):
            if source_color(item, "CvtColorTensor") == self.color:
                item["result"] = image
            else:
                item["result"] = kernels.swap_rb_u8(image)
            item["color"] = self.color

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [ANY_IMAGE], [ANY_IMAGE]


class FusedPreprocessTensor(_GpuImage):
    """Resize + colour order + ``(v - mean) / std`` + HWC->CHW in one kernel.

    Output: a [1, 3, resize_h, resize_w] float32 DeviceArray, channels in ``color`` order
    (the source order when ``color`` is unset); ``mean``/``std`` are in 0-255 units and
    indexed in the output order.
    """

    kernel_names = ("fused_preprocess",)
    Options = FusedPreprocessOptions

    def init(self, context: InstanceContext) -> None:
        super().init(context)
        options = context.options(FusedPreprocessOptions)
        self.height, self.width = resize_size(ResizeOptions(options.resize_h, options.resize_w), "FusedPreprocessTensor")
        self.color = options.color
        self.mean, self.std = normalisation(options.mean, options.std, context.config.get("std"))

    def validate(self, item: dict[str, Any]) -> None:
        super().validate(item)
        source_color(item, "FusedPreprocessTensor")

    def forward(self, items: list[dict[str, Any]]) -> None:
        for item, image in zip(items, self.device_images(items)):
            source = source_color(item, "FusedPreprocessTensor")
            target = self.color or source
            item["result"] = kernels.fused_preprocess(image, self.height, self.width, self.mean, self.std, source != target)
            item["color"] = target

    def io_spec(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [ANY_IMAGE], [TensorSpec("input", "float32", (1, 3, self.height, self.width))]
