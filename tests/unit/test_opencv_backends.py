"""DecodeMat, ResizeMat and CvtColorMat against OpenCV itself, plus their config and input errors."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

import trtserve
from trtserve.backend import InstanceContext
from trtserve.backends.opencv import CvtColorMat, DecodeMat, ResizeMat
from trtserve.config import load_config
from trtserve.errors import ConfigError, InvalidInputError

pytestmark = pytest.mark.timeout(60)


def _image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _jpeg(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".jpg", image)
    assert ok
    return encoded.tobytes()


def _backend(cls, **config):
    backend = cls()
    backend.init(InstanceContext({"max": 1, "min": 1, **config}))
    return backend


# --------------------------------------------------------------------------- DecodeMat


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, lambda b: np.frombuffer(b, np.uint8)])
def test_decode_jpeg_equals_cv2_for_every_bytes_like(wrap):
    jpeg = _jpeg(_image())
    item = {"data": wrap(jpeg)}
    decoder = _backend(DecodeMat)
    decoder.validate(item)
    decoder.forward([item])
    expected = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(item["result"], expected)
    assert item["result"].dtype == np.uint8 and item["result"].shape == (48, 64, 3)
    assert item["color"] == "bgr"


def test_decode_png_is_lossless_and_gray_becomes_three_channels():
    image = _image(20, 30)
    gray = image[:, :, 0].copy()
    items = [{"data": cv2.imencode(".png", image)[1].tobytes()}, {"data": cv2.imencode(".png", gray)[1].tobytes()}]
    _backend(DecodeMat).forward(items)
    np.testing.assert_array_equal(items[0]["result"], image)
    assert items[1]["result"].shape == (20, 30, 3)
    np.testing.assert_array_equal(items[1]["result"][:, :, 2], gray)


@pytest.mark.parametrize(
    "broken",
    [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 64, "truncated"],
    ids=["empty", "garbage", "jpeg-header-only", "truncated"],
)
def test_decode_soft_fails_on_bad_bytes_and_keeps_the_batch_going(broken):
    good = _jpeg(_image())
    if broken == "truncated":
        broken = good[:100]
    items = [{"data": good}, {"data": broken}, {"data": good}]
    decoder = _backend(DecodeMat)
    decoder.validate(items[1])  # bytes are the right *type*: refused only by the decoder
    decoder.forward(items)
    assert "result" not in items[1] and "color" not in items[1]
    assert items[0]["result"].shape == items[2]["result"].shape == (48, 64, 3)


@pytest.mark.parametrize(
    "data, described",
    [
        ("a string", "str"),
        ([1, 2, 3], "list"),
        (None, "NoneType"),
        (np.zeros(10, np.float32), "float32"),
        (np.zeros((4, 4), np.uint8), "(4, 4)"),
    ],
)
def test_decode_refuses_non_bytes_with_the_offending_type(data, described):
    with pytest.raises(InvalidInputError) as info:
        _backend(DecodeMat).validate({"data": data})
    assert described in info.value.message and described in info.value.details["received"]
    assert "open(path, 'rb').read()" in info.value.message


def test_decode_refuses_non_contiguous_memoryview():
    strided = memoryview(np.arange(20, dtype=np.uint8))[::2]
    with pytest.raises(InvalidInputError):
        _backend(DecodeMat).validate({"data": strided})


# --------------------------------------------------------------------------- ResizeMat


@pytest.mark.parametrize("src, dst", [((48, 64), (32, 32)), ((10, 10), (64, 40)), ((33, 17), (33, 17))])
def test_resize_equals_cv2_linear(src, dst):
    image = _image(*src)
    items = [{"data": image}, {"data": _image(*src, seed=1)}]
    resizer = _backend(ResizeMat, resize_h=dst[0], resize_w=dst[1])
    resizer.validate(items[0])
    resizer.forward(items)
    for item in items:
        expected = cv2.resize(item["data"], (dst[1], dst[0]), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(item["result"], expected)
        assert item["result"].shape == (*dst, 3)


def test_resize_counts_one_per_image_whatever_its_height():
    assert _backend(ResizeMat, resize_h=8, resize_w=8).request_size({"data": _image(500, 10)}) == 1


@pytest.mark.parametrize(
    "data, described",
    [
        (np.zeros((8, 8, 3), np.float32), "float32"),
        (np.zeros((8, 8), np.uint8), "(8, 8)"),
        (np.zeros((8, 8, 4), np.uint8), "(8, 8, 4)"),
        (np.zeros((0, 8, 3), np.uint8), "(0, 8, 3)"),
        (b"\xff\xd8", "bytes"),
    ],
)
def test_resize_refuses_non_images_naming_what_it_got(data, described):
    resizer = _backend(ResizeMat, resize_h=4, resize_w=4)
    with pytest.raises(InvalidInputError) as info:
        resizer.validate({"data": data})
    assert described in info.value.message
    assert "DecodeMat" in info.value.message  # the fix
    with pytest.raises(InvalidInputError):  # forward checks too: S[...] validates only stage one
        resizer.forward([{"data": data}])


@pytest.mark.parametrize("missing, given", [("resize_h", {"resize_w": 8}), ("resize_w", {"resize_h": 8})])
def test_resize_missing_key_is_a_config_error_naming_it(missing, given):
    with pytest.raises(ConfigError) as info:
        trtserve.pipe({"backend": "ResizeMat", **given})
    assert info.value.details["key"] == missing
    assert f"{missing} = 224" in info.value.message  # the fix


@pytest.mark.parametrize(
    "config, key",
    [
        ({"resize_h": 0, "resize_w": 8}, "resize_h"),
        ({"resize_h": 8, "resize_w": "8"}, "resize_w"),
        ({"resize_h": 8, "resize_w": 8, "resize_x": 8}, "resize_x"),
    ],
)
def test_resize_bad_keys_fail_at_load(config, key):
    with pytest.raises(ConfigError) as info:
        load_config({"backend": "ResizeMat", **config})
    assert info.value.details["key"] == key


def test_resize_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'resize_h'"):
        load_config({"backend": "ResizeMat", "resize_hh": 8, "resize_w": 8})


# --------------------------------------------------------------------------- CvtColorMat


def test_cvtcolor_bgr_to_rgb_equals_cv2_and_defaults_to_bgr():
    image = _image()
    tagged, untagged = {"data": image, "color": "bgr"}, {"data": image}
    _backend(CvtColorMat, color="rgb").forward([tagged, untagged])
    expected = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    for item in (tagged, untagged):
        np.testing.assert_array_equal(item["result"], expected)
        assert item["color"] == "rgb"


def test_cvtcolor_rgb_to_bgr_and_same_order_passes_through():
    image = _image()
    swap, same = {"data": image, "color": "rgb"}, {"data": image, "color": "bgr"}
    _backend(CvtColorMat, color="bgr").forward([swap, same])
    np.testing.assert_array_equal(swap["result"], cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert same["result"] is image
    assert swap["color"] == same["color"] == "bgr"


def test_cvtcolor_refuses_unknown_item_color():
    with pytest.raises(InvalidInputError) as info:
        _backend(CvtColorMat, color="rgb").validate({"data": _image(), "color": "hsv"})
    assert "'hsv'" in info.value.message and info.value.details["received"] == "'hsv'"


def test_cvtcolor_refuses_non_images():
    with pytest.raises(InvalidInputError, match="float64"):
        _backend(CvtColorMat, color="rgb").validate({"data": np.zeros((4, 4, 3))})


def test_cvtcolor_config_errors():
    with pytest.raises(ConfigError) as missing:
        trtserve.pipe({"backend": "CvtColorMat"})
    assert missing.value.details["key"] == "color" and 'color = "rgb"' in missing.value.message
    with pytest.raises(ConfigError) as bad:
        load_config({"backend": "CvtColorMat", "color": "hsv"})
    assert bad.value.details["key"] == "color" and "'hsv'" in bad.value.message


# --------------------------------------------------------------------------- chained in a pipe


def test_sequential_chain_through_pipe_equals_cv2_chain():
    config = {"backend": "S[DecodeMat,ResizeMat,cvtColorMat]", "resize_h": 24, "resize_w": 32, "color": "rgb"}
    images = [_image(50, 70, seed=s) for s in range(3)]
    items = [{"data": _jpeg(im)} for im in images] + [{"data": b"broken"}]
    with trtserve.pipe(config) as models:
        models(items)
        with pytest.raises(InvalidInputError):  # the chain's first stage validates before queueing
            models({"data": images[0]})
    for item in items[:3]:
        decoded = cv2.imdecode(np.frombuffer(item["data"], np.uint8), cv2.IMREAD_COLOR)
        expected = cv2.cvtColor(cv2.resize(decoded, (32, 24), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(item["result"], expected)
        assert item["color"] == "rgb"
    assert "result" not in items[3]
    assert isinstance(items[0]["data"], bytes)  # the caller's input comes back untouched


def test_image_io_spec():
    resizer = _backend(ResizeMat, resize_h=24, resize_w=32)
    assert resizer.io_spec()[1][0].shape == (24, 32, 3)
    assert _backend(DecodeMat).io_spec()[0][0].dtype == "bytes"
