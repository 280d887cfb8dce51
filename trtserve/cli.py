"""The ``trtserve`` command line (also ``python -m trtserve``).

``trtserve serve --repository PATH`` listens at once (``live`` answers), loads the
repository, and prints exactly one line to stdout once the start-up models have loaded::

    trtserve listening on 127.0.0.1:8001

(scripts and tests wait for it; logs go to stderr).  SIGINT/SIGTERM shut down gracefully
and exit 0, while models load too.  Exit status 2: bad arguments, repository, token or TLS
files; 1: cannot listen.
docs/server.md lists the flags; docs/operations.md explains model control, metrics and
access control.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys

from trtserve_client.wire import DEFAULT_MAX_FRAME

from .errors import ConfigError, TrtserveError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _integer(low: int, what: str):
    """An argparse type: an integer of at least ``low`` (``what`` names it in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _integer(1, "a positive integer")
_whole = _integer(0, "a whole number >= 0")


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


def _optional_port(text: str) -> int | None:
    return None if text.lower() == "off" else _port(text)


def build_parser() -> argparse.ArgumentParser:
    from .server.app import DEFAULT_GRACE_S, DEFAULT_MAX_IN_FLIGHT
    from .server.auth import DEFAULT_AUTH_TIMEOUT_S
    from .server.control import DEFAULT_POLL_INTERVAL_S, MODES
    from .server.shm import DEFAULT_MAX_BYTES, DEFAULT_MAX_REGIONS
    from .server.tracker import DEFAULT_MAX_CONNECTIONS

    from . import __version__
    from trtserve_client.wire import PROTOCOL_VERSION

    parser = argparse.ArgumentParser(prog="trtserve", description="A small, fast model server for TensorRT and ONNX models.")
    parser.add_argument("--version", action="version", version=f"trtserve {__version__} (protocol version {PROTOCOL_VERSION})")
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
    _model_control_flags(serve, MODES, DEFAULT_POLL_INTERVAL_S)
    serve.add_argument("--max-connections", type=_positive_int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                       help="at this many open connections a newcomer closes the connection idle the longest; "
                            "with none idle it is refused with RESOURCE_EXHAUSTED (default: %(default)s)")
    serve.add_argument("--io-threads", type=_positive_int, default=None, metavar="N",
                       help="event loops that read and write the connections, each on its own thread "
                            "(default: one per 4 CPU cores, at most 4)")
    _hostile_peer_flags(serve)
    serve.add_argument("--token-file", metavar="PATH",
                       help="require this shared token (the file's content) in an auth request first on every connection")
    serve.add_argument("--auth-timeout", type=_seconds, default=DEFAULT_AUTH_TIMEOUT_S, metavar="SECONDS",
                       help="with --token-file: close connections that have not authenticated by then (default: %(default)s)")
    serve.add_argument("--tls-cert", metavar="PATH", help="serve TLS with this PEM certificate chain (needs --tls-key)")
    serve.add_argument("--tls-key", metavar="PATH", help="the PEM private key of --tls-cert")
    serve.add_argument("--metrics-port", type=_optional_port, default=None, metavar="PORT",
                       help="serve Prometheus metrics over HTTP on --host:PORT (default: off)")
    serve.add_argument("--no-shared-memory", dest="shared_memory", action="store_false",
                       help="refuse the shm_register/shm_unregister/shm_status operations (clients send tensors inline)")
    serve.add_argument("--shm-max-regions", type=_positive_int, default=DEFAULT_MAX_REGIONS, metavar="N",
                       help="shared-memory regions one connection may register (default: %(default)s)")
    serve.add_argument("--shm-max-bytes", type=_positive_int, default=DEFAULT_MAX_BYTES, metavar="BYTES",
                       help="bytes of shared memory one connection may map (default: %(default)s = 16 GiB)")
    serve.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS, help="(default: %(default)s)")
    _ray_flags(serve)
    return parser


def _ray_flags(serve: argparse.ArgumentParser) -> None:
    """Scale-out on Ray Serve (docs/scaling.md).  Parsing them imports no Ray."""
    from .scaleout.settings import DEFAULT_APP_PREFIX, DEFAULT_DEPLOY_TIMEOUT_S

    ray = serve.add_argument_group("Ray Serve (needs the [ray] extra)")
    ray.add_argument("--ray", type=_ray_address, default=None, metavar="ADDRESS",
                     help="serve each model as a Ray Serve deployment behind this front door: 'local' (start a "
                          "Ray cluster here), 'auto' (this machine's cluster or RAY_ADDRESS), HOST:PORT or "
                          "ray://HOST:PORT (default: off, models run in this process)")
    ray.add_argument("--ray-set", type=_ray_override, action="append", default=[], metavar="[MODEL:]KEY=VALUE",
                     help="override a key of the models' [ray] config table (every model, or MODEL's), "
                          "e.g. num_replicas=2 or resnet:num_gpus=1 (repeatable)")
    ray.add_argument("--ray-app-prefix", default=DEFAULT_APP_PREFIX, metavar="PREFIX",
                     help="Serve application names are PREFIX + model name (default: %(default)s)")
    ray.add_argument("--ray-deploy-timeout", type=_positive_seconds, default=DEFAULT_DEPLOY_TIMEOUT_S, metavar="SECONDS",
                     help="a model whose replicas do not all run by then (too few CPUs/GPUs in the cluster, "
                          "say) is UNAVAILABLE with Serve's reason (default: %(default)s)")


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a number of seconds > 0, got 0")
    return value


def _ray_address(text: str) -> str:
    from .scaleout.cluster import check_address

    try:
        return check_address(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _ray_override(text: str):
    from .scaleout.settings import parse_override

    try:
        return parse_override(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _model_control_flags(serve: argparse.ArgumentParser, modes: tuple[str, ...], poll_default: float) -> None:
    serve.add_argument("--model-control", choices=modes, default="none",
                       help="none: load every model at start, refuse load/unload; poll: also rescan the repository; "
                            "explicit: load only --load-model models at start, then only through load/unload "
                            "(default: %(default)s)")
    serve.add_argument("--load-model", action="append", metavar="NAME",
                       help="explicit mode: load this model at start (repeatable; '*' = every model)")
    serve.add_argument("--poll-interval", type=_seconds, default=None, metavar="SECONDS",
                       help=f"poll mode: rescan the repository this often (default: {poll_default:g})")
    serve.add_argument("--allow-model-control", action="store_true",
                       help="poll mode: also let clients load and unload models (explicit mode always does)")


def _hostile_peer_flags(serve: argparse.ArgumentParser) -> None:
    """Memory and reaping limits (server/budget.py, server/reaper.py; docs/operations.md)."""
    from .server.reaper import DEFAULT_IDLE_S, DEFAULT_MIN_RECEIVE_RATE, DEFAULT_RECEIVE_S, DEFAULT_WRITE_S

    serve.add_argument("--max-buffered", type=_positive_int, default=None, metavar="BYTES",
                       help="request bytes read and not yet answered, over all connections, before the server stops "
                            "reading (default: a quarter of the machine's or container's memory)")
    serve.add_argument("--max-buffered-per-connection", type=_positive_int, default=None, metavar="BYTES",
                       help="the same for one connection (default: an eighth of --max-buffered, at least --max-frame)")
    serve.add_argument("--idle-timeout", type=_seconds, default=DEFAULT_IDLE_S, metavar="SECONDS",
                       help="close connections that sent no request for this long; 0 = never (default: %(default)s)")
    serve.add_argument("--receive-timeout", type=_seconds, default=DEFAULT_RECEIVE_S, metavar="SECONDS",
                       help="window over which a started frame must arrive at --min-receive-rate; 0 = off "
                            "(default: %(default)s)")
    serve.add_argument("--min-receive-rate", type=_whole, default=DEFAULT_MIN_RECEIVE_RATE, metavar="BYTES",
                       help="bytes per second a started frame must arrive at; 0 = off (default: %(default)s)")
    serve.add_argument("--write-timeout", type=_seconds, default=DEFAULT_WRITE_S, metavar="SECONDS",
                       help="abort connections whose unread answers have not gone down for this long; 0 = never "
                            "(default: %(default)s)")


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

    if args.ray is None:
        if args.ray_set:
            raise ConfigError(f"--ray-set {args.ray_set[0].text!r} applies only with --ray ADDRESS; add --ray or drop it",
                              key="ray_set")
        return await _serve(args, ModelRepository(args.repository))
    from .scaleout.frontdoor import ray_repository

    with ray_repository(args.ray, args.repository, args.ray_set, args.ray_app_prefix,
                        args.ray_deploy_timeout) as repository:
        return await _serve(args, repository)


async def _serve(args: argparse.Namespace, repository) -> int:
    from .server import Server
    from .server.auth import read_token_file, server_ssl_context

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both (a PEM certificate and its key) or neither")
    server = Server(
        repository,
        host=args.host,
        port=args.port,
        max_frame=args.max_frame,
        max_in_flight_per_connection=args.max_in_flight,
        allow_model_control=args.allow_model_control,
        grace_s=args.grace_period,
        poll_interval_s=args.poll_interval,
        model_control=args.model_control,
        load_models=args.load_model,
        max_connections=args.max_connections,
        token=None if args.token_file is None else read_token_file(args.token_file),
        auth_timeout_s=args.auth_timeout,
        ssl_context=None if args.tls_cert is None else server_ssl_context(args.tls_cert, args.tls_key),
        metrics_port=args.metrics_port,
        shared_memory=args.shared_memory,
        shm_max_regions=args.shm_max_regions,
        shm_max_bytes=args.shm_max_bytes,
        max_buffered=args.max_buffered,
        max_buffered_per_connection=args.max_buffered_per_connection,
        idle_timeout_s=args.idle_timeout,
        receive_timeout_s=args.receive_timeout,
        min_receive_rate=args.min_receive_rate,
        write_timeout_s=args.write_timeout,
        io_threads=args.io_threads,
    )

    def ready() -> None:
        # What loading built (modules, models, sessions) lives as long as the process: moved
        # out of the collector's reach, the collections that pipelined requests trigger stop
        # walking it (docs/performance.md).  Done here, not in Server, since it is process-wide.
        gc.collect()
        gc.freeze()
        print(f"trtserve listening on {server.host}:{server.port}", flush=True)

    await server.serve_forever(on_ready=ready)
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
