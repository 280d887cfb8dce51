"""nvImageCodec's decoders on 32 640x480 JPEGs: images/s at 1, 8 and 32 images per call.

Compares the default decoder with one restricted to each backend kind (the hardware JPEG
engines, the CUDA decoder, the hybrid CPU-GPU one, the CPU); ``DecodeTensor`` picks the
hardware decoder where it exists because of what this shows.  Run from the repository
root on a machine with a GPU and nvImageCodec: ``python3 bench/gpu/decoders.py``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "gpu"))

import cupy  # noqa: E402
from nvidia import nvimgcodec  # noqa: E402
from support import jpeg, photo  # noqa: E402

KINDS = ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU", "CPU_ONLY")


def decoders() -> dict[str, Any]:
    """The default decoder and one per backend kind this release has (an error if it cannot start)."""
    found: dict[str, Any] = {"default": nvimgcodec.Decoder(device_id=0)}
    for name in KINDS:
        if hasattr(nvimgcodec.BackendKind, name):
            try:
                backend = nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, name))
                found[name] = nvimgcodec.Decoder(device_id=0, backends=[backend])
            except Exception as exc:  # e.g. no such engine on this GPU
                found[name] = exc
    return found


def rate(decoder: Any, images: list[bytes], per_call: int, stream: Any, params: Any, seconds: float = 1.0) -> float:
    def once() -> None:
        for start in range(0, len(images), per_call):
            chunk = images[start:start + per_call]
            out = decoder.decode(chunk if per_call > 1 else chunk[0], params=params, cuda_stream=stream.ptr)
            if per_call > 1 and any(image is None for image in out):
                raise RuntimeError("an image was not decoded")
        stream.synchronize()

    once()  # initialisation outside the measurement
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        once()
        count += len(images)
    return count / (time.perf_counter() - began)


def main() -> None:
    images = [jpeg(photo(480, 640, seed=200 + i)) for i in range(32)]
    stream = cupy.cuda.Stream(non_blocking=True)
    params = nvimgcodec.DecodeParams(color_spec=getattr(nvimgcodec.ColorSpec, "RGB", None) or nvimgcodec.ColorSpec.SRGB)
    print("| decoder | 1 per call | 8 per call | 32 per call |\n|---|---|---|---|")
    for name, decoder in decoders().items():
        if isinstance(decoder, Exception):
            print(f"| {name} | unavailable: {decoder} | | |")
            continue
        rates = [f"{rate(decoder, images, n, stream, params):.0f}" for n in (1, 8, 32)]
        print(f"| {name} | " + " | ".join(rates) + " |")


if __name__ == "__main__":
    main()
