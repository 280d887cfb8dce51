"""The CUDA layer's pure logic, on a machine without a GPU.

Error mapping and sticky classification run against the real cuda-bindings enums when
cuda-python is importable here (it imports without a driver), and against stand-in enums
of the same type names otherwise.  The resize kernel's arithmetic is checked against
OpenCV through a numpy transcription of the kernel.  GPU models must fail to load with a
typed error on this machine.
"""
from __future__ import annotations

import ctypes
import enum
import pickle
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

import trtserve
from trtserve import cuda
from trtserve.backends.gpu import kernels
from trtserve.backends.imagecheck import channel_values
from trtserve.cuda import errors as cuda_errors
from trtserve.cuda.nvrtc import _dims, _param, arch_option
from trtserve.errors import ConfigError, DeviceError, ErrorCode, ModelUnavailableError, error_from_wire

pytestmark = pytest.mark.timeout(120)

try:
    from cuda.bindings import driver as real_driver
    from cuda.bindings import nvrtc as real_nvrtc
    from cuda.bindings import runtime as real_runtime
except ImportError:
    real_driver = real_runtime = real_nvrtc = None


# Stand-ins with the type names check() dispatches on (cuda-bindings' enums are IntEnums too).
class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_OUT_OF_MEMORY = 2
    CUDA_ERROR_ILLEGAL_ADDRESS = 700
    CUDA_ERROR_MISALIGNED_ADDRESS = 716
    CUDA_ERROR_LAUNCH_FAILED = 719


class cudaError_t(enum.IntEnum):  # noqa: N801 - the runtime's own spelling
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorNotReady = 600
    cudaErrorIllegalAddress = 700
    cudaErrorMisalignedAddress = 716


class nvrtcResult(enum.IntEnum):  # noqa: N801
    NVRTC_SUCCESS = 0
    NVRTC_ERROR_COMPILATION = 6


ENUM_SETS = [pytest.param((CUresult, cudaError_t, nvrtcResult), id="stand-in-enums")]
if real_driver is not None:
    ENUM_SETS.append(
        pytest.param((real_driver.CUresult, real_runtime.cudaError_t, real_nvrtc.nvrtcResult), id="cuda-bindings-enums")
    )


@pytest.fixture(autouse=True)
def _no_poison(monkeypatch):
    """Each test starts with a usable device, and what it poisons is forgotten after it."""
    monkeypatch.setattr(cuda_errors, "_poisoned", None)


# --------------------------------------------------------------------------- check()


@pytest.mark.parametrize("enums", ENUM_SETS)
def test_check_returns_values_on_success(enums):
    for success in (e(0) for e in enums):
        assert cuda.check((success,)) is None
        assert cuda.check((success, 42)) == 42
        assert cuda.check((success, 1, "two")) == (1, "two")
        assert cuda.check(success) is None  # a bare result code


@pytest.mark.parametrize("enums", ENUM_SETS)
def test_non_sticky_error_is_typed_and_does_not_poison(enums):
    driver_enum, runtime_enum, _ = enums
    for err, api in ((driver_enum(2), "driver"), (runtime_enum(2), "runtime")):
        with pytest.raises(cuda.CudaError) as info:
            cuda.check((err, None), "cudaMalloc(1 TiB)")
        exc = info.value
        assert isinstance(exc, DeviceError) and exc.code == ErrorCode.DEVICE_ERROR
        assert exc.sticky is False and exc.error_code == 2 and exc.details["api"] == api
        assert exc.error_name == err.name and err.name in exc.message and "cudaMalloc(1 TiB)" in exc.message
        assert not cuda.is_poisoned()
        cuda.raise_if_poisoned()


@pytest.mark.parametrize("enums", ENUM_SETS)
@pytest.mark.parametrize("which", ["driver", "runtime"])
def test_sticky_error_poisons_the_process(enums, which):
    err = (enums[0] if which == "driver" else enums[1])(700)
    with pytest.raises(cuda.CudaError) as info:
        cuda.check((err,), "cudaEventSynchronize")
    assert info.value.sticky and "Restart the server process" in info.value.message
    assert cuda.is_poisoned() and cuda.poisoned_error() is info.value
    with pytest.raises(cuda.CudaError) as again:
        cuda.raise_if_poisoned()
    assert again.value.sticky and again.value.details["poisoned"] is True
    assert err.name in again.value.message
    # a second sticky error keeps the first as the cause
    with pytest.raises(cuda.CudaError):
        cuda.check(((enums[0] if which == "driver" else enums[1])(716),))
    assert cuda.poisoned_error() is info.value


@pytest.mark.parametrize("enums", ENUM_SETS)
def test_nvrtc_errors_are_never_sticky(enums):
    with pytest.raises(cuda.CudaError) as info:
        cuda.check((enums[2](6),))
    assert info.value.details["api"] == "nvrtc" and not info.value.sticky and not cuda.is_poisoned()


def test_check_rejects_what_is_not_a_cuda_result():
    with pytest.raises(TypeError, match="CUresult, cudaError_t or nvrtcResult"):
        cuda.check((0, 1))
    with pytest.raises(TypeError):
        cuda.check(())


@pytest.mark.skipif(real_driver is None, reason="cuda-python not installed here: pip install cuda-python to check enum values")
def test_sticky_codes_match_the_real_enums():
    for code in cuda.STICKY_CODES:
        driver_err, runtime_err = real_driver.CUresult(code), real_runtime.cudaError_t(code)
        assert cuda.is_sticky(driver_err) and cuda.is_sticky(runtime_err)
    assert real_driver.CUresult(700).name == "CUDA_ERROR_ILLEGAL_ADDRESS"
    assert real_runtime.cudaError_t(719).name == "cudaErrorLaunchFailure"
    assert not cuda.is_sticky(real_runtime.cudaError_t.cudaErrorMemoryAllocation)
    assert not cuda.is_sticky(real_runtime.cudaError_t.cudaErrorNotReady)
    # the library's own description is used when the bindings are there
    assert "illegal memory access" in cuda_errors.describe(real_runtime.cudaError_t(700))


def test_cuda_error_survives_pickle_and_the_wire():
    exc = cuda_errors.error_for(cudaError_t(2), "cudaMalloc")
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is cuda.CudaError and again.details == exc.details and again.message == exc.message
    wired = error_from_wire(exc.to_wire())
    assert isinstance(wired, DeviceError) and wired.details["error"] == "cudaErrorMemoryAllocation"


# --------------------------------------------------------------------------- imports


def test_imports_never_touch_cuda_or_torch_and_report_why_unavailable():
    """With cuda-python and torch made unimportable, everything still imports."""
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('cuda', 'torch', 'tensorrt', 'tensorrt_rtx', 'cupy'):
                    raise ImportError('blocked for this test: ' + name)
        sys.meta_path.insert(0, Block())
        import trtserve.cuda as c
        import trtserve.backends.gpu, trtserve.backends.gpu.sync, trtserve.backends.gpu.image
        import trtserve.backends.gpu.torchscript, trtserve.backends.gpu.kernels
        assert not any(m.split('.')[0] in ('cuda', 'torch') for m in sys.modules), sorted(sys.modules)
        assert c.is_available() is False
        print(c.unavailable_reason())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "cuda-python is not installed" in out.stdout


needs_no_gpu = pytest.mark.skipif(cuda.is_available(), reason="checks the CPU-only behaviour; this machine has a GPU")


@needs_no_gpu
def test_is_available_never_raises_here():
    assert cuda.is_available() is False  # CI and development machines have no GPU
    assert cuda.unavailable_reason()
    with pytest.raises(cuda.CudaError, match="no CUDA device"):
        cuda.require_device(0)


# --------------------------------------------------------------------------- arrays


def test_cuda_array_interface_dict():
    cai = cuda.cuda_array_interface(0xDEAD00, (2, 3, 4), np.float32, 0x5000)
    assert cai == {"shape": (2, 3, 4), "typestr": "<f4", "data": (0xDEAD00, False), "version": 3, "strides": None, "stream": 0x5000}
    assert cuda.cuda_array_interface(16, [5], np.uint8, None).get("stream", "absent") == "absent"
    assert cuda.cuda_array_interface(16, [5], np.uint8, 0)["stream"] == 1  # legacy stream: 0 is reserved


def test_device_array_views_share_the_owner_and_offset_pointers():
    owner = object()
    a = cuda.DeviceArray(0x10000, (4, 3, 2), np.float32, owner=owner)
    assert (a.ndim, a.size, a.nbytes, len(a)) == (3, 24, 96, 4)
    assert a.__cuda_array_interface__["shape"] == (4, 3, 2) and "stream" not in a.__cuda_array_interface__
    rows = a.rows(1, 3)
    assert rows.ptr == 0x10000 + 24 and rows.shape == (2, 3, 2) and rows.owner is a
    flat = a.reshape(-1, 2)
    assert flat.shape == (12, 2) and flat.ptr == a.ptr and flat.owner is a
    with pytest.raises(ValueError):
        a.reshape(5, 5)
    with pytest.raises(IndexError):
        a.rows(3, 5)


def test_from_cuda_array_wraps_foreign_objects_and_refuses_strided_ones():
    class Foreign:
        __cuda_array_interface__ = {"shape": (2, 3), "typestr": "<i4", "data": (4096, False), "version": 2, "strides": (12, 4)}

    wrapped = cuda.DeviceArray.from_cuda_array(Foreign())
    assert (wrapped.ptr, wrapped.shape, wrapped.dtype) == (4096, (2, 3), np.dtype("int32"))

    class Strided:
        __cuda_array_interface__ = {"shape": (2, 3), "typestr": "<i4", "data": (4096, False), "version": 2, "strides": (4, 8)}

    with pytest.raises(ValueError, match="C-contiguous"):
        cuda.DeviceArray.from_cuda_array(Strided())


# --------------------------------------------------------------------------- NVRTC


def test_kernel_cache_key_separates_what_changes_the_binary():
    base = cuda.kernel_cache_key("src", "k", ["-O3"], 0, (9, 0))
    assert base == cuda.kernel_cache_key("src", "k", ("-O3",), 0, (9, 0))
    others = [
        cuda.kernel_cache_key("src2", "k", ["-O3"], 0, (9, 0)),
        cuda.kernel_cache_key("src", "k2", ["-O3"], 0, (9, 0)),
        cuda.kernel_cache_key("src", "k", [], 0, (9, 0)),
        cuda.kernel_cache_key("src", "k", ["-O3"], 1, (9, 0)),
        cuda.kernel_cache_key("src", "k", ["-O3"], 0, (8, 0)),
    ]
    assert len({base, *others}) == 6
    hash(base)


def test_arch_option_targets_the_real_architecture():
    supported = [75, 80, 86, 87, 89, 90, 100, 120]
    assert arch_option((9, 0), supported) == ("--gpu-architecture=sm_90", True)
    assert arch_option((12, 1), supported) == ("--gpu-architecture=compute_120", False)  # newer: PTX, driver JITs
    with pytest.raises(ValueError):
        arch_option((6, 0), supported)


def test_kernel_arguments_must_name_their_c_type():
    assert _param(ctypes.c_int32(3), 0, "k").value == 3
    assert _param(cuda.DeviceArray(0x1234, (1,), np.uint8), 1, "k").value == 0x1234
    with pytest.raises(TypeError, match="ctypes"):
        _param(3, 2, "k")
    assert _dims(5, "grid") == (5, 1, 1) and _dims((2, 3), "block") == (2, 3, 1)
    with pytest.raises(ValueError):
        _dims((0, 1), "grid")


def _nvrtc_loads() -> bool:
    try:
        from cuda.bindings import nvrtc

        return int(nvrtc.nvrtcVersion()[0]) == 0
    except Exception:  # no cuda-python, or no libnvrtc (pip install nvidia-cuda-nvrtc)
        return False


@pytest.mark.skipif(not _nvrtc_loads(), reason="NVRTC not loadable here (pip install cuda-python nvidia-cuda-nvrtc)")
def test_gpu_kernel_sources_compile_for_hopper_without_a_gpu():
    """NVRTC needs no device: every kernel trtserve ships compiles for sm_90 (cubin) and to PTX."""
    from trtserve.cuda.nvrtc import compile_to_image

    for name in kernels.NAMES:
        assert len(compile_to_image(kernels.SOURCE, name, (), "--gpu-architecture=sm_90")) > 1000
    assert b".entry fused_preprocess" in compile_to_image(kernels.SOURCE, "fused_preprocess", (), "--gpu-architecture=compute_90")
    with pytest.raises(cuda.CudaError) as info:
        compile_to_image('extern "C" __global__ void k(float* p) { p[0] = nope; }', "k", (), "--gpu-architecture=sm_90")
    assert "nope" in info.value.details["log"] and not info.value.sticky


# --------------------------------------------------------------------------- the resize arithmetic


def _kernel_resize(src: np.ndarray, height: int, width: int) -> np.ndarray:
    """A line-by-line numpy transcription of kernels.SOURCE's resize_linear_u8."""

    def tap(dsize: int, ssize: int):
        scale = kernels.opencv_scale(ssize, dsize)
        f = ((np.arange(dsize) + 0.5) * scale - 0.5).astype(np.float32)
        s = np.floor(f).astype(np.int64)
        f = (f - s.astype(np.float32)).astype(np.float32)
        low, high = s < 0, s >= ssize - 1
        f[low], s[low] = 0, 0
        f[high], s[high] = 0, ssize - 1
        w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int64)
        w1 = np.rint(f * np.float32(2048)).astype(np.int64)
        return s, np.minimum(s + 1, ssize - 1), w0, w1

    x0, x1, a0, a1 = tap(width, src.shape[1])
    y0, y1, b0, b1 = tap(height, src.shape[0])
    s = src.astype(np.int64)
    h0 = s[y0][:, x0] * a0[None, :, None] + s[y0][:, x1] * a1[None, :, None]
    h1 = s[y1][:, x0] * a0[None, :, None] + s[y1][:, x1] * a1[None, :, None]
    v = (((h0 >> 4) * b0[:, None, None]) >> 16) + (((h1 >> 4) * b1[:, None, None]) >> 16)
    return np.clip((v + 2) >> 2, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "src_hw,dst_hw",
    [((480, 640), (224, 224)), ((37, 53), (100, 77)), ((1080, 1920), (540, 960)), ((7, 5), (3, 2)), ((1, 1), (4, 4)), ((300, 451), (299, 299))],
)
def test_resize_kernel_arithmetic_matches_opencv_within_one_lsb(src_hw, dst_hw):
    src = np.random.default_rng(sum(src_hw)).integers(0, 256, (*src_hw, 3), dtype=np.uint8)
    ref = cv2.resize(src, dst_hw[::-1], interpolation=cv2.INTER_LINEAR)
    diff = np.abs(_kernel_resize(src, *dst_hw).astype(int) - ref)
    assert diff.max() <= 1
    assert (diff == 0).mean() > 0.99  # only OpenCV's scalar row tails round differently


def test_mean_std_parsing():
    assert channel_values("123.675, 116.28,103.53", "mean") == (123.675, 116.28, 103.53)
    assert channel_values([1, 2, 3], "mean") == (1.0, 2.0, 3.0)
    assert channel_values((1, 2, 3), "mean") == (1.0, 2.0, 3.0)  # as typed options hold a list
    assert channel_values(127.5, "mean") == (127.5,) * 3
    for bad in ([1, 2], "a,b,c", [True, 1, 2]):
        with pytest.raises(ConfigError):
            channel_values(bad, "mean")
    with pytest.raises(ConfigError, match="mean"):
        trtserve.config.load_config(
            {"backend": "SyncTensor[FusedPreprocessTensor]", "resize_h": 2, "resize_w": 2, "mean": [1, 2]}
        )


# --------------------------------------------------------------------------- GPU models here


@needs_no_gpu
@pytest.mark.parametrize(
    "backend",
    [
        "SyncTensor[S[DecodeTensor,ResizeTensor,CvtColorTensor]]",
        "SyncTensor[S[DecodeTensor,FusedPreprocessTensor]]",
        "SyncTensor[TorchScriptTensor]",
    ],
)
def test_gpu_models_fail_to_load_with_a_typed_reason(backend, tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"not loaded: SyncTensor fails before its child initialises")
    if "TorchScript" in backend:
        config = {"backend": backend, "model": str(model), "max": 4}
    else:
        config = {"backend": backend, "resize_h": 8, "resize_w": 8, "color": "rgb"}
    with pytest.raises(ModelUnavailableError) as info:
        trtserve.pipe(config)
    assert info.value.message.startswith("no CUDA device: ") and "SyncTensor[" in info.value.message


def test_gpu_image_backend_outside_synctensor_says_how_to_wrap_it():
    with pytest.raises(ConfigError, match=r"wrap the chain in SyncTensor"):
        trtserve.pipe({"backend": "S[DecodeMat,ResizeTensor]", "resize_h": 8, "resize_w": 8})
