"""Decompression bombs against the example classifier (``model_repository/classifier``,
DecodeMat): an image's size is read from its header and anything over ``max_pixels`` is
refused before decoding, as a NO_RESULT that says why."""
from __future__ import annotations

import struct
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from .conftest import RawConn
from .hostile_support import assert_normal_client_served, baseline_p99
from .ops_support import log_problems, rss_mb, server_process

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parents[2] / "model_repository"


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` black pixels: 48 KB that decode to 1.2 GB
    of BGR (an 8-bit RGB one is 1.17 MB and takes 11 s to make; to a decoder it is the same bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte, then the row's bits
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_a_small_bomb_decodes_as_an_image_would():
    """The bomb is a real PNG: the same bytes at 300 x 300 decode."""
    decoded = cv2.imdecode(np.frombuffer(png_bomb(300, 300), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (300, 300, 3)


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    """Decoded, one such request takes 2.4 GB and seconds of CPU; refused, four at once take
    milliseconds and nothing."""
    bomb = png_bomb()
    assert len(bomb) < 64 * 1024
    with server_process(EXAMPLES, tmp_path / "server.log", "--log-level", "WARNING") as proc:
        pid = proc.proc.pid
        unloaded = baseline_p99(proc.host, proc.port)
        base = rss_mb(pid)
        answers: list[dict] = []

        def send() -> None:
            with RawConn(proc.host, proc.port) as conn:
                started = time.perf_counter()
                answers.append({**conn.error("infer", model="classifier", inputs={"image": bomb}),
                                "seconds": time.perf_counter() - started})

        senders = [threading.Thread(target=send) for _ in range(4)]
        for sender in senders:
            sender.start()
        assert_normal_client_served(proc.host, proc.port, unloaded)
        for sender in senders:
            sender.join(30)
        assert len(answers) == 4
        for answer in answers:
            assert answer["name"] == "NO_RESULT", answer
            assert "DecodeMat refused a 20000 x 20000 image (400000000 pixels)" in answer["message"]
            assert "max_pixels = 67108864" in answer["message"]
            assert answer["seconds"] < 1.0
        grown = rss_mb(pid) - base
        assert grown < 32  # nothing decoded
        print(f"png bomb: 4 at once answered in {max(a['seconds'] for a in answers) * 1e3:.1f} ms at most; RSS +{grown:.1f} MiB")
        image = cv2.imencode(".png", np.full((64, 64, 3), 128, np.uint8))[1].tobytes()
        with RawConn(proc.host, proc.port) as conn:  # a real image is still classified
            probs = conn.result("infer", model="classifier", inputs={"image": image})["outputs"]["probs"]
            assert probs["shape"] == [10]
    assert not log_problems(proc.log())
