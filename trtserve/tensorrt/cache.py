"""The engine cache: one verified engine file next to each ONNX model.

``1/model.onnx`` is cached as ``1/model.onnx.trtcache``::

    b"TRTSERVE-ENGINE\\0" | u32 header length | header (JSON) | serialized engine

The header holds the cache key, the key's readable components, the engine's size and
sha256, and the engine's I/O.  A hit is used only when the magic, the key, the size and the
sha256 all match, so a stale, truncated or bit-flipped file is never handed to TensorRT
(whose deserializer is not built to survive garbage).  A changed key rebuilds quietly; a
damaged file logs a warning and rebuilds.  Files are written to a temporary name and moved
into place with os.replace, so readers see the old file or the new one, never half of one.

The key is the sha256 of: the ONNX bytes (and of external weight files), the build spec
(batch min/opt/max, per-row input shapes, precision, workspace), the TensorRT module and
version, the build target (see build_target), and CACHE_SCHEMA, which changes whenever
trtserve's own way of building changes.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ConfigError, ModelUnavailableError
from .build import BuildSpec, build_engine
from .io import EngineIO
from .module import module_identity

CACHE_SCHEMA = 1
CACHE_SUFFIX = ".trtcache"
MAGIC = b"TRTSERVE-ENGINE\x00"
_LEN = struct.Struct("<I")
_MAX_HEADER = 1 << 20
log = logging.getLogger("trtserve.tensorrt")

_path_locks: dict[str, threading.Lock] = {}
_path_locks_guard = threading.Lock()


@dataclass
class EngineArtifact:
    """A serialized engine ready to deserialize, and where it came from."""

    plan: bytes
    io: EngineIO | None  # None for a .plan file: only the engine itself knows
    source: str  # "built", "cache" or "plan"
    path: Path  # the cache file, or the plan file
    key: str | None = None


class CacheMiss(Exception):
    """Why a cache file was not used; ``damaged`` separates corruption from a changed key."""

    def __init__(self, reason: str, damaged: bool) -> None:
        super().__init__(reason)
        self.damaged = damaged


def build_target(trt: ModuleType) -> str:
    """What the engine is built for, as the cache key sees it.

    * tensorrt_rtx builds ahead of time without looking at any GPU: the plan targets the
      builder's default set of compute capabilities (8.0 8.6 8.9 12.0+) and is specialised
      just in time on the GPU that loads it.  So the target is ``"rtx-aot:default"`` on a
      CPU machine and a GPU machine alike.
    * full TensorRT builds for the GPU it runs on: ``"<GPU name> sm_<major><minor>"``.
    """
    if trt.__name__ == "tensorrt_rtx":
        return "rtx-aot:default"
    return current_gpu()


def current_gpu() -> str:
    """``"<name> sm_<major><minor>"`` of the current CUDA device (full TensorRT's build target)."""
    try:
        from .. import cuda
    except ImportError as exc:
        raise ModelUnavailableError(f"building with full TensorRT needs a CUDA GPU, but trtserve.cuda is missing: {exc}") from None
    if not cuda.is_available():
        raise ModelUnavailableError(
            f"building with full TensorRT needs a CUDA GPU and none is available ({cuda.unavailable_reason()}); "
            "on a CPU-only machine build with tensorrt_rtx (trt_module = 'tensorrt_rtx')",
        )
    info = cuda.device_info(cuda.ensure_device())
    major, minor = info.compute_capability
    return f"{info.name} sm_{major}{minor}"


def cache_path(model: Path) -> Path:
    return model.with_name(model.name + CACHE_SUFFIX)


def key_components(trt: ModuleType, model: Path, data: bytes, spec: BuildSpec, target: str) -> dict[str, Any]:
    return {
        "schema": CACHE_SCHEMA,
        "onnx_sha256": hashlib.sha256(data).hexdigest(),
        "external_data": _external_data(model, data),
        "spec": spec.key_fields(),
        "tensorrt": module_identity(trt),
        "target": target,
    }


def cache_key(components: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


def ensure_engine(
    trt: ModuleType,
    model: Path,
    spec: BuildSpec,
    *,
    use_cache: bool = True,
    target: str | None = None,
    force_rebuild: bool = False,
) -> EngineArtifact:
    """The engine for ``model`` built for ``spec``: from the cache when it matches, else built.

    ``force_rebuild`` skips the cache (the caller found a cached plan TensorRT would not load).
    """
    model = Path(model)
    try:
        data = model.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{model}: cannot read the ONNX model: {exc}", file=str(model)) from None
    components = key_components(trt, model, data, spec, target if target is not None else build_target(trt))
    key = cache_key(components)
    path = cache_path(model)
    if not use_cache:
        built = build_engine(trt, model, spec)
        return EngineArtifact(built.plan, built.io, "built", model, key)
    with _build_lock(path, model):
        if not force_rebuild:
            try:
                header, plan = read_cache(path, key)
                log.debug("engine cache hit: %s (key %s)", path, key[:12])
                return EngineArtifact(plan, EngineIO.from_dict(header["io"]), "cache", path, key)
            except FileNotFoundError:
                log.info("no engine cache at %s; building", path)
            except CacheMiss as miss:
                if miss.damaged:
                    log.warning("engine cache %s is damaged (%s); rebuilding it", path, miss)
                else:
                    log.info("engine cache %s is stale (%s); rebuilding it", path, miss)
        built = build_engine(trt, model, spec)
        header = {
            "format": 1,
            "key": key,
            "components": components,
            "payload_size": len(built.plan),
            "payload_sha256": hashlib.sha256(built.plan).hexdigest(),
            "io": built.io.to_dict(),
            "profile": built.profile,
            "build_seconds": round(built.seconds, 3),
        }
        try:
            write_cache(path, header, built.plan)
        except OSError as exc:  # a read-only model folder must not stop the model loading
            log.warning("cannot write engine cache %s (%s); the engine will be rebuilt at every load", path, exc)
        return EngineArtifact(built.plan, built.io, "built", path, key)


def read_cache(path: Path, key: str) -> tuple[dict[str, Any], bytes]:
    """(header, plan) when ``path`` holds an intact engine for ``key``; else CacheMiss."""
    blob = path.read_bytes()
    start = len(MAGIC) + _LEN.size
    if len(blob) < start or not blob.startswith(MAGIC):
        raise CacheMiss("not a trtserve engine cache file (bad magic or too short)", damaged=True)
    (header_len,) = _LEN.unpack_from(blob, len(MAGIC))
    if header_len > _MAX_HEADER or start + header_len > len(blob):
        raise CacheMiss(f"header length {header_len} does not fit a {len(blob)}-byte file", damaged=True)
    try:
        header = json.loads(blob[start : start + header_len])
        cached_key, size, digest = header["key"], int(header["payload_size"]), header["payload_sha256"]
        EngineIO.from_dict(header["io"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheMiss(f"unreadable header: {type(exc).__name__}: {exc}", damaged=True) from None
    if cached_key != key:
        raise CacheMiss(f"built for another key: {_changed(header.get('components'), key)}", damaged=False)
    plan = blob[start + header_len :]
    if len(plan) != size:
        raise CacheMiss(f"engine is {len(plan)} bytes, header says {size} (truncated?)", damaged=True)
    if hashlib.sha256(plan).hexdigest() != digest:
        raise CacheMiss("engine bytes do not match their sha256 (corrupted)", damaged=True)
    return header, plan


def write_cache(path: Path, header: dict[str, Any], plan: bytes) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then os.replace."""
    head = json.dumps(header, sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; the server may run as another user than the builder
        with os.fdopen(fd, "wb") as fh:
            fh.write(MAGIC + _LEN.pack(len(head)) + head)
            fh.write(plan)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_plan(path: Path) -> EngineArtifact:
    """A prebuilt ``.plan`` / ``.engine`` file, used as is (no build, no cache)."""
    path = Path(path)
    try:
        plan = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the engine file: {exc}", file=str(path)) from None
    if not plan:
        raise ModelUnavailableError(f"{path}: the engine file is empty; rebuild it", file=str(path))
    return EngineArtifact(plan, None, "plan", path)


def _changed(old: Any, key: str) -> str:
    if not isinstance(old, dict):
        return f"new key {key[:12]}"
    return f"new key {key[:12]} (cached components: {json.dumps(old, sort_keys=True)[:300]})"


def _external_data(model: Path, data: bytes) -> dict[str, str]:
    """sha256 of each external weight file the model names (ONNX models over 2 GB use them).

    External tensors carry a "location" entry; a model without those bytes has none, which
    spares loading the protobuf.  Listing them needs the onnx package.
    """
    if b"location" not in data:
        return {}
    try:
        import onnx
    except ImportError:
        log.warning("%s may use external weight files, but the onnx package is not installed to list them; "
                    "changes to those files will not invalidate the engine cache (pip install onnx)", model)
        return {}
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as exc:  # the TensorRT parser will report a broken model properly
        log.debug("onnx could not read %s (%s); no external data listed", model, exc)
        return {}
    files = {}
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in files:
                target = model.parent / entry.value
                try:
                    files[entry.value] = _sha256_file(target)
                except OSError as exc:
                    raise ConfigError(f"{model}: external weight file {target} cannot be read: {exc}", file=str(model)) from None
    return dict(sorted(files.items()))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _build_lock(path: Path, model: Path) -> Iterator[None]:
    """One build per cache file: a thread lock, plus flock on the model so processes agree too."""
    with _path_locks_guard:
        lock = _path_locks.setdefault(str(path), threading.Lock())
    with lock:
        try:
            fd = os.open(model, os.O_RDONLY)
        except OSError:
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released with the fd; advisory, so best effort
            except OSError as exc:
                log.debug("cannot flock %s (%s); relying on the in-process lock", model, exc)
            yield
        finally:
            os.close(fd)
