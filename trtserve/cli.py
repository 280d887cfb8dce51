"""The ``trtserve`` command line (also ``python -m trtserve``).

``trtserve serve --repository PATH`` loads the repository, listens and prints exactly one
line to stdout once it accepts connections::

    trtserve listening on 127.0.0.1:8001

(scripts and tests wait for it; logs go to stderr).  SIGINT/SIGTERM shut down gracefully
and exit 0.  Exit status 2: bad arguments or repository; 1: cannot listen.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from trtserve_client.wire import DEFAULT_MAX_FRAME

from .errors import TrtserveError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535 (0 = any free port), got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .server.app import DEFAULT_GRACE_S, DEFAULT_MAX_IN_FLIGHT

    parser = argparse.ArgumentParser(prog="trtserve", description="A small, fast model server for TensorRT and ONNX models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve a model repository over TCP")
    serve.add_argument("--repository", required=True, metavar="PATH", help="model repository folder (<model>/config.toml)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=_port, default=8001, help="TCP port; 0 picks a free one (default: %(default)s)")
    serve.add_argument("--max-frame", type=_positive_int, default=DEFAULT_MAX_FRAME, metavar="BYTES",
                       help="largest request frame accepted (default: %(default)s = 64 MiB)")
    serve.add_argument("--max-in-flight", type=_positive_int, default=DEFAULT_MAX_IN_FLIGHT, metavar="N",
                       help="unanswered requests per connection before the server stops reading it (default: %(default)s)")
    serve.add_argument("--grace-period", type=_seconds, default=DEFAULT_GRACE_S, metavar="SECONDS",
                       help="on SIGINT/SIGTERM, how long requests in flight may take to finish (default: %(default)s)")
    serve.add_argument("--poll-interval", type=_seconds, default=0.0, metavar="SECONDS",
                       help="poll mode: rescan the repository this often, loading added, reloading changed and "
                            "unloading removed models (default: 0 = off)")
    serve.add_argument("--allow-model-control", action="store_true",
                       help="let clients load and unload models (refused with PERMISSION_DENIED otherwise)")
    serve.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, help="(default: %(default)s)")
    return parser


def use_uvloop() -> bool:
    """Install uvloop as the event loop policy when it is available (it is on Linux)."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def serve(args: argparse.Namespace) -> int:
    from .repository import ModelRepository
    from .server import Server

    server = Server(
        ModelRepository(args.repository),
        host=args.host,
        port=args.port,
        max_frame=args.max_frame,
        max_in_flight_per_connection=args.max_in_flight,
        allow_model_control=args.allow_model_control,
        grace_s=args.grace_period,
        poll_interval_s=args.poll_interval or None,
    )
    await server.start()
    print(f"trtserve listening on {server.host}:{server.port}", flush=True)
    await server.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not use_uvloop():
        logging.getLogger("trtserve").warning("uvloop is not installed; using the default asyncio loop")
    try:
        return asyncio.run(serve(args))
    except TrtserveError as exc:
        print(f"trtserve: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"trtserve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; "
              "pick another --port or stop whatever holds it", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the signal handlers were installed (while loading)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
