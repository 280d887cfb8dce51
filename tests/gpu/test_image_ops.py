"""GPU image backends against OpenCV on the CPU: resize within 1 LSB, exact colour swap,
decode identical to cv2.imdecode, fused preprocessing within 1 LSB / std.  The tests that
assert bit-exactness against OpenCV pin ``decoder = "opencv"``; nvImageCodec's decoder
(nvJPEG) has its own tests in test_nvimgcodec.py."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

import trtserve
from trtserve import cuda
from trtserve.backends.gpu import kernels

from . import support

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]

SIZES = [((480, 640), (224, 224)), ((37, 53), (100, 77)), ((1080, 1920), (540, 960)), ((7, 5), (3, 2)),
         ((1, 1), (4, 4)), ((300, 451), (299, 299)), ((720, 1280), (1080, 1920))]


@pytest.mark.parametrize("src_hw,dst_hw", SIZES)
def test_resize_kernel_matches_opencv_within_one_lsb(src_hw, dst_hw, stream):
    src = support.photo(*src_hw, seed=sum(src_hw))
    out = kernels.resize_u8(cuda.to_device(src), *dst_hw).to_host()
    ref = cv2.resize(src, dst_hw[::-1], interpolation=cv2.INTER_LINEAR)
    diff = np.abs(out.astype(int) - ref)
    assert out.shape == ref.shape and diff.max() <= 1
    assert (diff == 0).mean() > 0.99, f"bit-exact fraction {(diff == 0).mean():.4f}"


def test_swap_kernel_is_exact(stream):
    src = support.photo(33, 47, seed=3)
    np.testing.assert_array_equal(kernels.swap_rb_u8(cuda.to_device(src)).to_host(), cv2.cvtColor(src, cv2.COLOR_BGR2RGB))


def _photos(n: int, h: int = 360, w: int = 480) -> list[bytes]:
    return [support.jpeg(support.photo(h + 7 * i, w + 5 * i, seed=i)) for i in range(n)]


@pytest.mark.parametrize(
    "expression",
    ["SyncTensor[S[DecodeTensor,ResizeTensor,CvtColorTensor]]", "S[DecodeTensor,ResizeTensor,CvtColorTensor,SyncTensor]"],
)
def test_decode_resize_cvtcolor_chain_matches_the_opencv_chain(expression):
    images = _photos(6)
    config = {"backend": expression, "resize_h": 224, "resize_w": 200, "decoder": "opencv",
              "color": "rgb", "instance_num": 2, "max": 4, "batching_timeout": 2}
    with trtserve.pipe(config) as models:
        items = [{"data": data} for data in images]
        models(items)
        single = {"data": images[0]}
        models(single)
    for data, item in zip(images, items + [single]):
        assert isinstance(item["result"], cuda.DeviceArray) and item["color"] == "rgb"
        out = item["result"].to_host()
        ref = support.cpu_chain(data, 224, 200)
        assert out.shape == ref.shape and np.abs(out.astype(int) - ref).max() <= 1


def test_decode_is_identical_to_imdecode_and_bad_bytes_are_soft_failures():
    images = _photos(2)
    with trtserve.pipe({"backend": "SyncTensor[DecodeTensor]", "max": 4, "decoder": "opencv"}) as models:
        items = [{"data": images[0]}, {"data": b"\xff\xd8 not a jpeg"}, {"data": images[1]}]
        models(items)
    assert "result" not in items[1]
    for data, item in ((images[0], items[0]), (images[1], items[2])):
        np.testing.assert_array_equal(item["result"].to_host(), cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
        assert item["color"] == "bgr"


def test_host_images_are_uploaded_by_the_first_gpu_stage():
    src = support.photo(100, 120, seed=9)
    with trtserve.pipe({"backend": "SyncTensor[ResizeTensor]", "resize_h": 50, "resize_w": 60}) as models:
        item = {"data": src}
        models(item)
    ref = cv2.resize(src, (60, 50), interpolation=cv2.INTER_LINEAR)
    assert np.abs(item["result"].to_host().astype(int) - ref).max() <= 1


def test_fused_preprocess_matches_the_unfused_reference():
    images = _photos(4, 480, 640)
    config = {"backend": "SyncTensor[S[DecodeTensor,FusedPreprocessTensor]]", "resize_h": 224, "resize_w": 224,
              "decoder": "opencv", "color": "rgb", "mean": list(support.MEAN), "std": list(support.STD), "max": 4}
    with trtserve.pipe(config) as models:
        items = [{"data": data} for data in images]
        models(items)
    bound = 1.0 / min(support.STD) + 1e-5  # one LSB of the resized value, after normalisation
    for data, item in zip(images, items):
        out = item["result"].to_host()
        ref = support.normalize_chw(support.cpu_chain(data, 224, 224))
        assert out.shape == (1, 3, 224, 224) and out.dtype == np.float32
        assert np.isfinite(out).all() and np.abs(out - ref).max() <= bound
        assert (np.abs(out - ref) < 1e-5).mean() > 0.99


def test_gpu_image_errors_are_typed():
    with trtserve.pipe({"backend": "SyncTensor[ResizeTensor]", "resize_h": 8, "resize_w": 8}) as models:
        with pytest.raises(trtserve.InvalidInputError, match="HWC uint8"):
            models({"data": np.zeros((4, 4), np.float32)})
    with pytest.raises(trtserve.ConfigError, match="resize_h"):
        trtserve.pipe({"backend": "SyncTensor[ResizeTensor]", "resize_w": 8})


@pytest.mark.parametrize("decoder", ["opencv", "auto"])
def test_decode_tensor_refuses_images_over_max_pixels_before_decoding(decoder):
    """The header's size is checked before either decoder runs: over ``max_pixels`` (and an
    image whose header gives no size) is a soft failure with the reason; the rest decode."""
    from trtserve.backend import NO_RESULT

    small = cv2.imencode(".jpg", support.photo(20, 30, seed=1))[1].tobytes()
    large = cv2.imencode(".png", support.photo(40, 50, seed=2))[1].tobytes()
    items = [{"data": small}, {"data": large}, {"data": b"\xff\xd8 not an image"}]
    with trtserve.pipe({"backend": "SyncTensor[DecodeTensor]", "decoder": decoder, "max": 4, "max_pixels": 1000}) as models:
        models(items)
    assert items[0]["result"].shape[:2] == (20, 30)
    assert "result" not in items[1] and "max_pixels = 1000" in items[1][NO_RESULT]
    assert "result" not in items[2] and "header" in items[2][NO_RESULT]
