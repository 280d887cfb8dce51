"""DecodeTensor's nvImageCodec path (nvJPEG on the GPU), where nvImageCodec is installed.

nvJPEG and OpenCV's libjpeg-turbo are different decoders: their IDCTs may differ by a few
LSB, and for 4:2:0 JPEGs their chroma upsampling differs at sharp colour edges.  So the
comparison with ``cv2.imdecode`` is by bounds, not bit-exact: 4:4:4 JPEGs (no upsampling)
within a few LSB everywhere, 4:2:0 JPEGs close on average.  The image ops after the
decode are compared with OpenCV on the same decoded pixels.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest

import trtserve
from trtserve import cuda

from . import support

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(180)]
nvimgcodec = pytest.importorskip("nvidia.nvimgcodec", reason="nvImageCodec is not installed (pip install nvidia-nvimgcodec-cu13)")


def _jpeg(image: np.ndarray, subsampling: int) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, subsampling])
    assert ok
    return data.tobytes()


def _reference_rgb(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _decode(images: list[bytes], decoder: str = "nvimgcodec", **extra) -> list[dict]:
    items = [{"data": data} for data in images]
    with trtserve.pipe({"backend": "SyncTensor[DecodeTensor]", "max": 4, "decoder": decoder, **extra}) as models:
        models(items)
    return items


def test_444_jpegs_decode_within_a_few_lsb_of_opencv():
    sizes = [(360, 480), (37, 53), (1080, 1920), (1, 1), (301, 451)]
    images = [_jpeg(support.photo(h, w, seed=i), cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444) for i, (h, w) in enumerate(sizes)]
    for data, item in zip(images, _decode(images)):
        assert isinstance(item["result"], cuda.DeviceArray) and item["color"] == "rgb"
        out, ref = item["result"].to_host(), _reference_rgb(data)
        diff = np.abs(out.astype(int) - ref)
        assert out.shape == ref.shape and out.dtype == np.uint8
        assert diff.max() <= 4 and diff.mean() < 0.5, f"{ref.shape}: max {diff.max()}, mean {diff.mean():.3f}"


def test_420_jpegs_decode_close_to_opencv():
    images = [_jpeg(support.photo(240 + 9 * i, 320 + 7 * i, seed=10 + i), cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420) for i in range(4)]
    for data, item in zip(images, _decode(images)):
        out, ref = item["result"].to_host(), _reference_rgb(data)
        diff = np.abs(out.astype(int) - ref)
        assert out.shape == ref.shape
        assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 16, f"mean {diff.mean():.3f}, p99 {np.percentile(diff, 99)}"


def test_bad_bytes_are_soft_failures_and_the_rest_of_the_batch_decodes():
    good = [_jpeg(support.photo(64, 80, seed=s), cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444) for s in (1, 2)]
    items = _decode([good[0], b"\xff\xd8 not a jpeg", good[1], b"\x00" * 64])
    assert "result" not in items[1] and "result" not in items[3]
    for data, item in ((good[0], items[0]), (good[1], items[2])):
        assert np.abs(item["result"].to_host().astype(int) - _reference_rgb(data)).max() <= 4


def test_auto_picks_nvimgcodec_and_the_chain_matches_opencv_on_its_pixels():
    """``decoder = "auto"`` uses nvImageCodec when it imports (colour "rgb", where OpenCV's
    path says "bgr"); resize + colour on the GPU then match OpenCV applied to the pixels
    nvJPEG decoded, within resize's 1 LSB."""
    images = [_jpeg(support.photo(300 + 5 * i, 400 + 3 * i, seed=20 + i), cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420) for i in range(3)]
    decoded = [item["result"].to_host() for item in _decode(images, decoder="auto")]
    config = {"backend": "SyncTensor[S[DecodeTensor,ResizeTensor,CvtColorTensor]]", "resize_h": 224, "resize_w": 200,
              "color": "bgr", "max": 4, "instance_num": 2}
    with trtserve.pipe(config) as models:
        items = [{"data": data} for data in images]
        models(items)
    for rgb, item in zip(decoded, items):
        assert item["color"] == "bgr"
        ref = cv2.cvtColor(cv2.resize(rgb, (200, 224), interpolation=cv2.INTER_LINEAR), cv2.COLOR_RGB2BGR)
        assert np.abs(item["result"].to_host().astype(int) - ref).max() <= 1


def test_many_threads_get_their_own_images():
    """Four instances decoding on their own streams, 16 threads, single and list calls."""
    import threading

    images = [_jpeg(support.photo(120 + i, 160 + 2 * i, seed=30 + i), cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444) for i in range(8)]
    refs = [_reference_rgb(data) for data in images]
    failures: list[str] = []
    with trtserve.pipe({"backend": "SyncTensor[DecodeTensor]", "decoder": "nvimgcodec", "instance_num": 4, "max": 4}) as models:

        def worker(seed: int) -> None:
            rng = np.random.default_rng(seed)
            for _ in range(25):
                picks = rng.integers(0, len(images), int(rng.integers(1, 4)))
                items = [{"data": images[k]} for k in picks]
                models(items if len(items) > 1 else items[0])
                for k, item in zip(picks, items):
                    out = item["result"].to_host()
                    if out.shape != refs[k].shape or np.abs(out.astype(int) - refs[k]).max() > 4:
                        failures.append(f"image {k}: shape {out.shape}")

        threads = [threading.Thread(target=worker, args=(s,)) for s in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures, failures[:5]


class _CountingDecoder:
    """nvImageCodec's decoder, recording how many images each call decoded."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[int] = []

    def decode(self, sources, **kwargs):
        self.calls.append(len(sources) if isinstance(sources, list) else 1)
        return self.inner.decode(sources, **kwargs)


def test_a_batch_of_jpegs_is_decoded_in_one_nvimgcodec_call():
    """With ``max = 8`` the decode node hands nvImageCodec the batch as one list, so a
    preprocessing node feeds its model node full batches."""
    images = [_jpeg(support.photo(240, 320, seed=40 + i), cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444) for i in range(8)]
    with trtserve.pipe({"backend": "SyncTensor[DecodeTensor]", "decoder": "nvimgcodec", "max": 8, "batching_timeout": 5}) as models:
        [counter] = models.pipeline.nodes[0].on_each_instance(lambda inst: _install_counter(inst.backend.children[0]))
        items = [{"data": data} for data in images]
        models(items)
    assert sum(counter.calls) == 8 and max(counter.calls) >= 4 and len(counter.calls) <= 3, counter.calls
    for data, item in zip(images, items):
        assert np.abs(item["result"].to_host().astype(int) - _reference_rgb(data)).max() <= 4


def _install_counter(decode_tensor) -> _CountingDecoder:
    decode_tensor.decoder = counter = _CountingDecoder(decode_tensor.decoder)
    return counter


def test_a_batch_mixing_what_the_hardware_decoder_refuses_decodes_every_image():
    """Baseline JPEGs, a progressive JPEG and a PNG in one batch: what the hardware JPEG
    decoder refuses goes to the general decoder, and every image matches OpenCV."""
    photo = support.photo(120, 160, seed=70)
    ok, png = cv2.imencode(".png", photo)
    ok2, progressive = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 95,
                                                    cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    assert ok and ok2
    baseline = [_jpeg(support.photo(120, 160, seed=71 + i), cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444) for i in range(2)]
    images = [baseline[0], png.tobytes(), progressive.tobytes(), baseline[1]]
    for data, item in zip(images, _decode(images)):
        assert np.abs(item["result"].to_host().astype(int) - _reference_rgb(data)).max() <= 4


def test_the_hardware_decoder_takes_the_batch_where_the_gpu_has_one():
    """On GPUs with hardware JPEG engines (A100, H100, ...) DecodeTensor decodes with them:
    batched, several times faster than the general decoder (docs/gpu.md)."""
    from trtserve.backends.gpu.image import hardware_decoder

    if hardware_decoder(nvimgcodec, 0) is None:
        pytest.skip("this GPU has no hardware JPEG decoder")
    with trtserve.pipe({"backend": "SyncTensor[DecodeTensor]", "decoder": "nvimgcodec"}) as models:
        [backend] = models.pipeline.nodes[0].on_each_instance(lambda inst: inst.backend.children[0])
        assert backend.decoder is not backend.fallback
