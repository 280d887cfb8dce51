"""The floor: a bare asyncio + uvloop server speaking trtserve's framing, doing nothing else.

It receives frames with frames.py's FrameDecoder (an ``asyncio.BufferedProtocol``, as the
server does) and answers ``infer`` with the request's inputs as outputs, in the same reply
shape as trtserve and written the same way (frame_parts + CoalescingWriter: the tensor bytes by
reference, through ``os.writev`` with the GIL released), so any trtserve client (and the load generator) can drive it unchanged.  Whatever trtserve costs on top of this is the
price of its scheduling, validation and model code.  Its connections are spread over
``--io-threads`` event loops exactly as the server spreads them (trtserve/server/listener.py;
same default).

    python bench/echo_server.py --host 127.0.0.1 --port 0   # prints "echo listening on HOST:PORT"
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "clients"), str(ROOT)]  # run from a checkout without installing

from trtserve.server.app import default_io_threads  # noqa: E402
from trtserve.server.listener import Acceptor, LoopThread, bind  # noqa: E402

from trtserve_client.errors import ErrorCode  # noqa: E402
from trtserve_client.frames import FrameDecoder, OutOfBand, frame_parts  # noqa: E402
from trtserve_client.wire import DEFAULT_MAX_FRAME  # noqa: E402
from trtserve_client.writer import CoalescingWriter  # noqa: E402


class EchoProtocol(asyncio.BufferedProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.writer = CoalescingWriter(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
        self.decoder = FrameDecoder(DEFAULT_MAX_FRAME)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            messages = self.decoder.buffer_updated(nbytes)
        except Exception:  # garbage on the wire: the floor does not try to recover
            self.transport.close()
            return
        if messages:  # one write per read, as a pipelining server batches its answers
            self.writer.write([part for m in messages if type(m) is dict for part in frame_parts(reply(m))], alone=True)


def reply(message: dict) -> dict:
    op = message.get("op")
    if op == "infer":
        outputs = {name: echoed(value) for name, value in message.get("inputs", {}).items()}
        return {"id": message.get("id"), "result": {"model": message.get("model"), "version": 1, "outputs": outputs}}
    if op == "live":
        return {"id": message.get("id"), "result": {"live": True}}
    error = {"code": int(ErrorCode.UNKNOWN_OPERATION), "name": "UNKNOWN_OPERATION", "message": f"the echo server only answers infer and live, not {op!r}", "details": {}}
    return {"id": message.get("id"), "error": error}


def echoed(value):
    """A received value sent back as it came: its bytes by reference, out of band again."""
    if isinstance(value, dict) and isinstance(value.get("data"), (bytes, memoryview)):
        return dict(value, data=OutOfBand(value["data"]))
    return OutOfBand(value) if isinstance(value, (bytes, memoryview)) else value


async def serve(host: str, port: int, io_threads: int) -> None:
    loop = asyncio.get_running_loop()
    loops = [loop] + [LoopThread(type(loop), f"echo-io-{i}").loop for i in range(1, io_threads)]
    turns = itertools.cycle(loops)

    def hand_off(sock) -> None:  # round robin: every echo connection costs the same
        target = next(turns)
        target.call_soon_threadsafe(lambda: target.create_task(target.connect_accepted_socket(EchoProtocol, sock)))

    sockets = bind(host, port)
    acceptor = Acceptor(sockets, hand_off)
    acceptor.start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound_host, bound_port = sockets[0].getsockname()[:2]
    print(f"echo listening on {bound_host}:{bound_port}", flush=True)
    await stop.wait()
    acceptor.close()
    await acceptor.wait_closed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--io-threads", type=int, default=default_io_threads())
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # still a floor, only a slower one; say so
        print("uvloop not installed: the echo floor runs on the default asyncio loop", file=sys.stderr)
        asyncio.run(serve(args.host, args.port, args.io_threads))
    else:
        uvloop.run(serve(args.host, args.port, args.io_threads))


if __name__ == "__main__":
    main()
