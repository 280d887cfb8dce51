"""The server's infer path in-process, without sockets: microseconds of Python per request.

A real ``Server`` loads the repository; a ``ServerProtocol`` with an in-memory transport is
fed bursts of ``infer`` frames (as one socket read delivers them) and the loop runs until
every answer is written.  What remains is the server's own work per request: frame
decoding, dispatch, validation, scheduling, the model, encoding, packing.  Kernel and
network costs are left out, so this isolates what a code change does to the Python path;
compare runs made one after the other (docs/performance.md).  Each burst is answered
before the next is fed: for an inline model that is all CPU; for a model on instance
threads the number also holds each burst's hand-offs (thread wake-ups, GIL transfers), so
compare such a model only with itself.

    python bench/server_path.py --model identity --bursts 3000 --per-burst 16 [--profile]
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "clients")]

from trtserve.server.app import Server  # noqa: E402
from trtserve.server.protocol import ServerProtocol  # noqa: E402
from trtserve_client.frames import pack  # noqa: E402
from trtserve_client.wire import encode_tensor  # noqa: E402


class MemoryTransport(asyncio.Transport):
    """Counts writes and their bytes; never pushes back."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = self.bytes = 0
        self.closing = False

    def write(self, data) -> None:
        self.writes += 1
        self.bytes += len(data)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def bursts(model: str, input_name: str, shape: tuple[int, ...], count: int, per_burst: int) -> list[bytes]:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    frames, ids = [], iter(range(1, count * per_burst + 1))
    for _ in range(count):
        frames.append(b"".join(pack({"v": 2, "op": "infer", "id": next(ids), "model": model,
                                     "inputs": {input_name: encode_tensor(x)}}) for _ in range(per_burst)))
    return frames


def feed(protocol: ServerProtocol, data: bytes) -> None:
    """``data`` into the protocol as a transport delivers it (asyncio.BufferedProtocol)."""
    view, pos = memoryview(data), 0
    while pos < len(view):
        buffer = protocol.get_buffer(-1)
        n = min(len(buffer), len(view) - pos)
        buffer[:n] = view[pos : pos + n]
        pos += n
        protocol.buffer_updated(n)


async def measure(args: argparse.Namespace) -> None:
    server = Server(args.repository, port=0, max_in_flight_per_connection=1 << 20)
    await server.start()
    try:
        protocol = ServerProtocol(server.dispatcher.dispatch, server.tracker)
        transport = MemoryTransport()
        protocol.connection_made(transport)
        data = bursts(args.model, args.input, tuple(args.shape), args.bursts, args.per_burst)
        for chunk in data[: max(1, len(data) // 10)]:  # warm up
            feed(protocol, chunk)
            while protocol.in_flight:
                await asyncio.sleep(0)
        profile = cProfile.Profile() if args.profile else None
        if profile:
            profile.enable()
        start = time.perf_counter()
        for chunk in data:
            feed(protocol, chunk)
            while protocol.in_flight:  # a threaded model answers through the loop
                await asyncio.sleep(0)
        elapsed = time.perf_counter() - start
        if profile:
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(30)
        requests = args.bursts * args.per_burst
        print(f"{args.model}: {elapsed / requests * 1e6:.2f} us per request, {requests / elapsed:.0f} requests/s, "
              f"{transport.writes} writes ({requests / max(transport.writes, 1):.1f} answers each)")
        protocol.connection_lost(None)
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", default=str(ROOT / "model_repository"))
    parser.add_argument("--model", default="identity")
    parser.add_argument("--input", default="input", help="input name (tensor_mlp: x)")
    parser.add_argument("--shape", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--bursts", type=int, default=3000)
    parser.add_argument("--per-burst", type=int, default=16, help="frames per socket read")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed part (slows it down)")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(measure(args))
    else:
        uvloop.run(measure(args))


if __name__ == "__main__":
    main()
