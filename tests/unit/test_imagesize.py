"""An image's size from its header (trtserve/backends/imagesize.py), for every format the
installed OpenCV encodes, and DecodeMat's refusal of images over max_pixels."""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from trtserve.backend import NO_RESULT, InstanceContext
from trtserve.backends.imagesize import image_size
from trtserve.backends.opencv import DecodeMat

IMAGE = np.random.default_rng(0).integers(0, 255, (37, 53, 3), np.uint8)
FORMATS = [".jpg", ".png", ".bmp", ".webp", ".tiff", ".ppm", ".pgm", ".pbm", ".pam", ".pfm", ".hdr", ".jp2",
           ".ras", ".gif", ".avif"]


def encoded(ext: str) -> bytes | None:
    image = IMAGE[:, :, 0].copy() if ext in (".pgm", ".pbm") else IMAGE
    if ext in (".pfm", ".hdr"):
        image = image.astype(np.float32)
    try:
        ok, buffer = cv2.imencode(ext, image)
    except cv2.error:
        return None
    return buffer.tobytes() if ok else None


@pytest.mark.parametrize("ext", FORMATS)
def test_every_format_opencv_writes_gives_its_size(ext):
    data = encoded(ext)
    if data is None:
        pytest.skip(f"this OpenCV build cannot write {ext}")
    assert image_size(data) == (53, 37)
    assert image_size(memoryview(data)) == image_size(np.frombuffer(data, np.uint8)) == (53, 37)


def test_jpeg_size_is_found_past_large_app_segments():
    jpeg = encoded(".jpg")
    app2 = b"\xff\xe2" + struct.pack(">H", 65535) + bytes(65533)  # an ICC profile's worth, twice
    assert image_size(jpeg[:2] + app2 * 2 + jpeg[2:]) == (53, 37)


@pytest.mark.parametrize("data", [b"", b"\xff\xd8", b"\x89PNG\r\n\x1a\n\x00", b"GIF8", b"not an image", bytes(100)])
def test_cut_or_unknown_headers_give_none(data):
    assert image_size(data) is None


def png_header(width: int, height: int) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))


def test_decodemat_refuses_images_over_max_pixels_before_decoding():
    decoder = DecodeMat()
    decoder.init(InstanceContext({"max_pixels": 53 * 37}))
    small, large, garbage = {"data": encoded(".png")}, {"data": png_header(20000, 20000)}, {"data": b"not an image"}
    decoder.forward([small, large, garbage])
    assert small["result"].shape == (37, 53, 3) and NO_RESULT not in small
    assert "result" not in large and "refused a 20000 x 20000 image (400000000 pixels)" in large[NO_RESULT]
    assert "max_pixels = 1961" in large[NO_RESULT]
    assert "result" not in garbage and "could not read the image's size" in garbage[NO_RESULT]
    decoder.init(InstanceContext({"max_pixels": 53 * 37 - 1}))
    decoder.forward([small := {"data": encoded(".png")}])
    assert "result" not in small
