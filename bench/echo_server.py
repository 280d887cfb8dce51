"""The floor: a bare asyncio + uvloop server speaking trtserve's framing, doing nothing else.

It decodes each frame with wire.py's FrameDecoder and answers ``infer`` with the request's
inputs as outputs, in the same reply shape as trtserve, so any trtserve client (and the
load generator) can drive it unchanged.  Whatever trtserve costs on top of this is the
price of its scheduling, validation and model code.

    python bench/echo_server.py --host 127.0.0.1 --port 0   # prints "echo listening on HOST:PORT"
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "clients"))  # run from a checkout without installing

from trtserve_client.errors import ErrorCode  # noqa: E402
from trtserve_client.wire import FrameDecoder, pack  # noqa: E402


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.decoder = FrameDecoder()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except Exception:  # garbage on the wire: the floor does not try to recover
            self.transport.close()
            return
        # One write per received chunk, as a pipelining server would batch its answers.
        self.transport.write(b"".join(pack(reply(message)) for message in messages))


def reply(message: dict) -> dict:
    op = message.get("op")
    if op == "infer":
        return {"id": message.get("id"), "result": {"model": message.get("model"), "version": 1, "outputs": message.get("inputs", {})}}
    if op == "live":
        return {"id": message.get("id"), "result": {"live": True}}
    error = {"code": int(ErrorCode.UNKNOWN_OPERATION), "name": "UNKNOWN_OPERATION", "message": f"the echo server only answers infer and live, not {op!r}", "details": {}}
    return {"id": message.get("id"), "error": error}


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoProtocol, host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    print(f"echo listening on {bound_host}:{bound_port}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # still a floor, only a slower one; say so
        print("uvloop not installed: the echo floor runs on the default asyncio loop", file=sys.stderr)
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
