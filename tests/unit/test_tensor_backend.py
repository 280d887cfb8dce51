"""Mat2Tensor against the same arithmetic done by hand with OpenCV and numpy."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

import trtserve
from trtserve.backend import InstanceContext
from trtserve.config import load_config
from trtserve.errors import ConfigError, InvalidInputError

pytestmark = pytest.mark.timeout(60)
MEAN_255, STD_255 = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
MEAN_1, STD_1 = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def run(config: dict, data) -> np.ndarray:
    with trtserve.pipe({"backend": "Mat2Tensor", **config}) as models:
        item = {"data": data}
        models(item)
        return item["result"]


def by_hand(rgb: np.ndarray, scale: float, mean, std) -> np.ndarray:
    """(x * scale - mean) / std per channel in float64, then HWC -> CHW."""
    normalised = (rgb.astype(np.float64) * scale - np.array(mean)) / np.array(std)
    return normalised.transpose(2, 0, 1)


@pytest.mark.parametrize("scale, mean, std", [(1, MEAN_255, STD_255), (1 / 255, MEAN_1, STD_1)], ids=["0-255", "scaled"])
def test_normalised_chw_float32_matches_numpy(scale, mean, std):
    rgb = image(37, 53)
    result = run({"scale": scale, "mean": mean, "std": std}, rgb)
    assert result.dtype == np.float32 and result.shape == (3, 37, 53) and result.flags.c_contiguous
    np.testing.assert_allclose(result, by_hand(rgb, scale, mean, std), rtol=1e-6, atol=2e-6)


def test_without_keys_it_is_a_plain_float_conversion_and_hwc_keeps_the_layout():
    rgb = image(5, 7)
    np.testing.assert_array_equal(run({}, rgb), rgb.transpose(2, 0, 1).astype(np.float32))
    hwc = run({"layout": "HWC", "mean": 10, "std": "2"}, rgb)
    assert hwc.shape == (5, 7, 3)
    np.testing.assert_allclose(hwc, (rgb.astype(np.float64) - 10) / 2, rtol=1e-6)


def test_torchpipe_string_form_of_mean_and_std():
    rgb = image(4, 4)
    result = run({"mean": "123.675, 116.28, 103.53", "std": "58.395 57.12 57.375"}, rgb)
    np.testing.assert_allclose(result, by_hand(rgb, 1, MEAN_255, STD_255), rtol=1e-6, atol=2e-6)


def test_the_whole_cpu_chain_from_jpeg_bytes_matches_opencv_by_hand():
    bgr = image(90, 120, seed=3)
    jpeg = cv2.imencode(".jpg", bgr)[1].tobytes()
    config = {"backend": "S[DecodeMat,ResizeMat,CvtColorMat,Mat2Tensor]", "resize_h": 48, "resize_w": 64,
              "color": "rgb", "scale": 1 / 255, "mean": MEAN_1, "std": STD_1, "max": 4}
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    rgb = cv2.cvtColor(cv2.resize(decoded, (64, 48), interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
    with trtserve.pipe(config) as models:
        items = [{"data": jpeg}, {"data": jpeg}]
        models(items)
    for item in items:
        assert item["result"].shape == (3, 48, 64) and item["color"] == "rgb"
        np.testing.assert_allclose(item["result"], by_hand(rgb, 1 / 255, MEAN_1, STD_1), rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize(
    "extra, key, fragment",
    [
        ({"std": [1, 0, 1]}, "std", "contains 0"),
        ({"mean": [1, 2]}, "mean", "must be 1 or 3 finite numbers"),
        ({"mean": "a, b, c"}, "mean", "must be 1 or 3 finite numbers"),
        ({"scale": 0}, "scale", "finite, non-zero"),
        ({"layout": "NCHW"}, "layout", "is not one of ['CHW', 'HWC']"),
    ],
)
def test_bad_keys_are_config_errors(extra, key, fragment):
    with pytest.raises(ConfigError) as caught:
        trtserve.pipe({"backend": "Mat2Tensor", **extra}).close()
    assert caught.value.details["key"] == key and fragment in caught.value.message


def test_a_bad_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('backend = "Mat2Tensor"\nmean = [1, 2]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.message.startswith(str(path))


@pytest.mark.parametrize("data", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), b"\xff\xd8"])
def test_what_is_not_an_hwc_uint8_image_is_refused_before_queueing(data):
    with pytest.raises(InvalidInputError, match="Mat2Tensor takes an HWC uint8 image"):
        run({}, data)


def test_each_image_counts_one_and_the_stage_says_what_it_produces():
    from trtserve.backend import TensorSpec
    from trtserve.backends.tensor import Mat2Tensor

    stage = Mat2Tensor()
    stage.init(InstanceContext({"layout": "CHW"}))
    assert stage.request_size({"data": image(9, 9)}) == 1
    (out,) = stage.produces([TensorSpec("image", "uint8", (48, 64, 3), layout="HWC")])
    assert (out.dtype, out.shape, out.layout) == ("float32", (3, 48, 64), "CHW")
