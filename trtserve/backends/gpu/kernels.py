"""CUDA kernels of the GPU image backends (NVRTC-compiled on first use) and their launchers.

Bilinear resize reproduces OpenCV's ``INTER_LINEAR`` on uint8 images: the same source
coordinates (``(d + 0.5) * scale - 0.5`` in float, clamped at the borders), the same
11-bit fixed-point weights, and the same vertical rounding as OpenCV's vectorised path.
Where OpenCV's scalar row tail rounds differently the result is 1 LSB off; the GPU tests
check "within 1 LSB" and report how many pixels are bit-exact.

Images are HWC uint8 DeviceArrays with 1-4 channels; one thread computes one output pixel.
Every launcher allocates its output stream-ordered on the given stream and enqueues there;
none of them waits.
"""
from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from ...cuda import DeviceArray, Kernel, Stream, compile_kernel, current_stream

SOURCE = r"""
struct Tap { int s0, s1, w0, w1; };

// One axis of OpenCV's INTER_LINEAR: source index pair and 11-bit weights.
__device__ __forceinline__ Tap tap(int d, double scale, int size) {
    float f = (float)((d + 0.5) * scale - 0.5);
    int s = (int)floorf(f);
    f -= (float)s;
    if (s < 0) { f = 0.f; s = 0; }
    if (s >= size - 1) { f = 0.f; s = size - 1; }
    Tap t;
    t.s0 = s;
    t.s1 = min(s + 1, size - 1);
    t.w0 = __float2int_rn((1.f - f) * 2048.f);
    t.w1 = __float2int_rn(f * 2048.f);
    return t;
}

// Horizontal pass in int, vertical pass as OpenCV's VResizeLinearVec_32s8u rounds it.
__device__ __forceinline__ int lerp_u8(const unsigned char* r0, const unsigned char* r1,
                                       Tap x, Tap y, int c, int cn) {
    int h0 = r0[x.s0 * cn + c] * x.w0 + r0[x.s1 * cn + c] * x.w1;
    int h1 = r1[x.s0 * cn + c] * x.w0 + r1[x.s1 * cn + c] * x.w1;
    int v = ((((h0 >> 4) * y.w0) >> 16) + (((h1 >> 4) * y.w1) >> 16) + 2) >> 2;
    return min(max(v, 0), 255);
}

extern "C" __global__ void resize_linear_u8(
        const unsigned char* __restrict__ src, int sh, int sw,
        unsigned char* __restrict__ dst, int dh, int dw, int cn,
        double scale_y, double scale_x) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= dw || y >= dh) return;
    Tap tx = tap(x, scale_x, sw), ty = tap(y, scale_y, sh);
    const unsigned char* r0 = src + (size_t)ty.s0 * sw * cn;
    const unsigned char* r1 = src + (size_t)ty.s1 * sw * cn;
    unsigned char* out = dst + ((size_t)y * dw + x) * cn;
    for (int c = 0; c < cn; ++c) out[c] = (unsigned char)lerp_u8(r0, r1, tx, ty, c, cn);
}

extern "C" __global__ void swap_rb_u8(const unsigned char* __restrict__ src,
                                      unsigned char* __restrict__ dst, long long pixels) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= pixels) return;
    const unsigned char* p = src + i * 3;
    unsigned char b = p[0], g = p[1], r = p[2];
    unsigned char* q = dst + i * 3;
    q[0] = r; q[1] = g; q[2] = b;
}

// Resize + channel order + (v - mean) / std + HWC -> CHW float, in one pass: the resized
// uint8 values are exactly ResizeTensor's, so the fused and unfused chains agree.  The host
// passes 1/std: a multiply instead of an IEEE division (~20 instructions) per channel; the
// result differs from (v - mean) / std by at most an ulp or two.
extern "C" __global__ void __launch_bounds__(256) fused_preprocess(
        const unsigned char* __restrict__ src, int sh, int sw,
        float* __restrict__ dst, int dh, int dw,
        double scale_y, double scale_x, int swap_rb,
        float m0, float m1, float m2, float inv0, float inv1, float inv2) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= dw || y >= dh) return;
    Tap tx = tap(x, scale_x, sw), ty = tap(y, scale_y, sh);
    const unsigned char* r0 = src + (size_t)ty.s0 * sw * 3;
    const unsigned char* r1 = src + (size_t)ty.s1 * sw * 3;
    float v0 = (float)lerp_u8(r0, r1, tx, ty, 0, 3);
    float v1 = (float)lerp_u8(r0, r1, tx, ty, 1, 3);
    float v2 = (float)lerp_u8(r0, r1, tx, ty, 2, 3);
    if (swap_rb) { float t = v0; v0 = v2; v2 = t; }
    size_t plane = (size_t)dh * dw, at = (size_t)y * dw + x;
    dst[at] = (v0 - m0) * inv0;
    dst[plane + at] = (v1 - m1) * inv1;
    dst[2 * plane + at] = (v2 - m2) * inv2;
}
"""

NAMES = ("resize_linear_u8", "swap_rb_u8", "fused_preprocess")
_BLOCK_2D = (32, 8)


def kernel(name: str, device: int | None = None) -> Kernel:
    """A compiled kernel of SOURCE (compiled once per process and device)."""
    return compile_kernel(SOURCE, name, device=device)


def opencv_scale(src: int, dst: int) -> float:
    """OpenCV's source step per destination pixel: ``1 / (dst / src)``, rounded as it does."""
    return 1.0 / (dst / src)


def _grid(width: int, height: int) -> tuple[int, int]:
    return (-(-width // _BLOCK_2D[0]), -(-height // _BLOCK_2D[1]))


def _hwc_u8(src: DeviceArray, what: str, channels: Sequence[int]) -> tuple[int, int, int]:
    if src.dtype != np.uint8 or src.ndim != 3 or src.shape[2] not in channels or 0 in src.shape:
        raise ValueError(f"{what} takes an HWC uint8 image with {list(channels)} channels, got {src!r}")
    return src.shape  # type: ignore[return-value]


def resize_u8(src: DeviceArray, height: int, width: int, stream: Stream | None = None) -> DeviceArray:
    """Bilinear resize of an HWC uint8 image to (height, width), OpenCV INTER_LINEAR."""
    sh, sw, cn = _hwc_u8(src, "resize", (1, 2, 3, 4))
    stream = stream or current_stream()
    dst = DeviceArray.empty((height, width, cn), np.uint8, stream)
    kernel("resize_linear_u8", dst.device).launch(
        _grid(width, height),
        _BLOCK_2D,
        [src, ctypes.c_int32(sh), ctypes.c_int32(sw), dst, ctypes.c_int32(height), ctypes.c_int32(width),
         ctypes.c_int32(cn), ctypes.c_double(opencv_scale(sh, height)), ctypes.c_double(opencv_scale(sw, width))],
        stream,
    )
    return dst


def swap_rb_u8(src: DeviceArray, stream: Stream | None = None) -> DeviceArray:
    """BGR <-> RGB of an HWC uint8 3-channel image."""
    h, w, _ = _hwc_u8(src, "colour swap", (3,))
    stream = stream or current_stream()
    dst = DeviceArray.empty(src.shape, np.uint8, stream)
    pixels = h * w
    kernel("swap_rb_u8", dst.device).launch(-(-pixels // 256), 256, [src, dst, ctypes.c_int64(pixels)], stream)
    return dst


def fused_preprocess(
    src: DeviceArray,
    height: int,
    width: int,
    mean: Sequence[float],
    std: Sequence[float],
    swap_rb: bool,
    stream: Stream | None = None,
) -> DeviceArray:
    """Resize + colour order + normalise + HWC->CHW: an HWC uint8 image in, [1, 3, H, W] float32 out."""
    sh, sw, _ = _hwc_u8(src, "fused preprocessing", (3,))
    stream = stream or current_stream()
    dst = DeviceArray.empty((1, 3, height, width), np.float32, stream)
    floats = [ctypes.c_float(v) for v in list(mean) + [1.0 / s for s in std]]
    kernel("fused_preprocess", dst.device).launch(
        _grid(width, height),
        _BLOCK_2D,
        [src, ctypes.c_int32(sh), ctypes.c_int32(sw), dst, ctypes.c_int32(height), ctypes.c_int32(width),
         ctypes.c_double(opencv_scale(sh, height)), ctypes.c_double(opencv_scale(sw, width)),
         ctypes.c_int32(int(swap_rb)), *floats],
        stream,
    )
    return dst
