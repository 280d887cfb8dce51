"""Shared by the GPU tests and bench/gpu: test kernels, images, and the ResNet model.

Imports torch/torchvision lazily: this module is imported on CPU-only CI too.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import cv2
import numpy as np

from trtserve import cuda

SPIN_SOURCE = r"""
extern "C" __global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
}
// Busy-wait, then write value to out (which may be pinned host memory: UVA maps it).
extern "C" __global__ void write_after_spin(long long cycles, float* out, float value) {
    long long start = clock64();
    while (clock64() - start < cycles) { }
    *out = value;
}
extern "C" __global__ void saxpy(float a, const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = a * x[i] + y[i];
}
extern "C" __global__ void illegal_write(float* p) { p[threadIdx.x] = 1.0f; }
"""

MEAN = (123.675, 116.28, 103.53)  # ImageNet, 0-255 units, RGB order
STD = (58.395, 57.12, 57.375)


def kernel(name: str) -> cuda.Kernel:
    return cuda.compile_kernel(SPIN_SOURCE, name)


def spin_cycles(ms: float) -> ctypes.c_int64:
    """clock64 cycles for about ``ms`` milliseconds at the device's clock (~2 GHz on H100)."""
    return ctypes.c_int64(int(ms * 2.0e6))


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """A BGR uint8 image with gradients, shapes and noise (never all zeros)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / max(w, 1) * 255, y / max(h, 1) * 255, (x + y) / max(h + w, 1) * 255], axis=-1)
    for _ in range(6):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(4, max(5, min(h, w) // 3))
        cv2.circle(img, (int(cx), int(cy)), int(r), tuple(float(c) for c in rng.integers(0, 256, 3)), -1)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return data.tobytes()


def cpu_chain(data: bytes, h: int, w: int) -> np.ndarray:
    """OpenCV's decode -> resize -> BGR2RGB: the reference of the GPU chain (HWC uint8 RGB)."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)


def normalize_chw(rgb: np.ndarray) -> np.ndarray:
    """(v - mean) / std, HWC -> [1, 3, H, W] float32, as FusedPreprocessTensor computes it."""
    x = (rgb.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def build_models(folder: Path) -> dict[str, object]:
    """Trace a ResNet-18 with random weights (torchvision's, else a plain-torch stand-in of the
    same shape) and an HWC-uint8 variant that normalises inside.  Returns paths and facts."""
    import torch

    torch.manual_seed(0)
    try:
        import torchvision

        net, source = torchvision.models.resnet18(weights=None), f"torchvision {torchvision.__version__} resnet18"
    except Exception as exc:  # pragma: no cover - depends on the machine
        net, source = _StandInResNet18(), f"plain-torch ResNet-18 stand-in (torchvision unavailable: {exc})"
    net = net.eval()

    class Hwc(torch.nn.Module):
        """uint8 [N, H, W, 3] RGB -> normalise -> the same network."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

        def forward(self, x):
            x = x.permute(0, 3, 1, 2).float()
            return self.inner((x - self.mean) / self.std)

    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        chw = torch.jit.trace(net, torch.rand(2, 3, 224, 224))
        hwc = torch.jit.trace(Hwc(net).eval(), torch.randint(0, 255, (2, 224, 224, 3), dtype=torch.uint8))
    paths = {"chw": folder / "resnet18_chw.pt", "hwc": folder / "resnet18_hwc.pt"}
    torch.jit.save(chw, str(paths["chw"]))
    torch.jit.save(hwc, str(paths["hwc"]))
    return {"paths": paths, "source": source, "cpu_chw": chw, "cpu_hwc": hwc}


def _StandInResNet18():  # noqa: N802 - a factory named like the class it builds
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            y = self.b2(self.c2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    return nn.Sequential(*layers)


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
