"""Fuzzing the wire: over 10,000 generated frames against a ``trtserve serve`` subprocess.

Each hypothesis example is a burst of 20-25 frames sent back to back on one connection:

* requests with a valid id whose every other field may have a wrong type or value: ``v``,
  ``op``, ``model``, ``version``, ``inputs`` (tensor ``dtype``/``shape``/``data``, raw bytes,
  anything), ``timeout_ms``, ``priority``, ``outputs``, plus unknown fields; tensor data
  and raw byte values inline or out of band, where a buffer reference may point past the
  frame, overlap another, or disagree with dtype x shape;
* optionally, as the burst's last frame, one that the protocol answers by closing the
  connection: an invalid ``id`` (missing, nil, wrong type, negative; msgpack cannot carry
  one >= 2**64), a payload that is not msgpack, a msgpack value that is not a map, a map
  with a non-string key, a declared length over ``--max-frame``, a truncated frame (then a
  half-close), a frame head with a wrong marker, layout, reserved field or map length, or
  raw random bytes.

Checked for every burst: every response is well formed (``{"id", "result"}`` or ``{"id",
"error"}`` with a known code, its name, a str message and a details map); ``INTERNAL`` never
appears (it means an operation raised something unexpected); each valid-id request is
answered exactly once when the connection stays open; a burst with a closing frame ends
with the ``"id": nil`` error the protocol names for it, then EOF.  After the run the server
answers correctly, its RSS grew less than ``RSS_BOUND_MB`` over the baseline taken after a
warm-up, and its log holds no traceback or unhandled-exception report.

Deterministic: ``derandomize=True`` runs the same examples every time, no example database.
No shrink phase: shrinking replays examples against the live server and can take minutes;
a failure prints its (unshrunk) burst, which names the frame well enough.
"""
from __future__ import annotations

import itertools
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from trtserve_client.errors import ErrorCode, TrtserveError
from trtserve_client.frames import BadFrame, FrameDecoder, decode_frame
from trtserve_client.wire import DTYPES, OPERATIONS

from .conftest import build_test_repository
from .ops_support import assert_healthy, log_problems, rss_mb, server_process

pytestmark = pytest.mark.timeout(120)

MAX_FRAME = 1 << 20  # a small --max-frame makes "huge declared length" cheap to test
EXAMPLES = 520
BURST = (20, 25)  # requests per example: at least 520 * 20 = 10,400 frames, plus the closers
MIN_FRAMES = 10_000
RSS_BOUND_MB = 48  # the fuzz holds at most one burst (25 small frames) in flight; 48 MiB is allocator noise plus slack
MODELS = ["identity", "echo", "pair", "blob", "flaky", "broken", "missing", ""]
INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can encode
CODES = {int(c) for c in ErrorCode} - {ErrorCode.CONNECTION_ERROR}  # 21 is client-side only


# --------------------------------------------------------------------------- strategies
# Fields draw from pools of hand-picked wrong values (one draw each) rather than from deep
# recursive strategies: the pools hold every type msgpack has, the boundary integers and
# the floats that break naive checks, and keep generation near 1 ms per frame (deep
# recursive strategies cost 3-4 ms), so 10,000 frames fit the time budget.

WRONG = [
    None, True, False, 0, -1, 1, 2, 7, 2**31, 2**63 - 1, 2**64 - 1, -(2**63), 0.0, -0.5, 1.5, 1e300,
    float("nan"), float("inf"), float("-inf"), "", "x", "identity", "1", "\u00e9\u20ac", "float32",
    b"", b"\x00", b"\xff" * 8, [], [1], [-1, 2], ["a"], [[1]], [None, {}], {}, {"a": 1},
    {"dtype": "float32"}, {"": None}, {"x": {"y": [1.5, b"z"]}},
]
BAD_DTYPES = ["float128", "complex64", "str", "object", "bytes", "Float32", "<f4", ""]
SHAPES = [
    [], [0], [1], [2], [4], [1, 4], [2, 4], [3, 4], [9, 4], [1, 1, 1], [0, 3], [2, 0, 5], [-1], [2, -3],
    [2**40], [2**31, 2**31], [2**62, 2**62, 0], [1] * 33, [1.5], ["2"], [None], [True],
]
ITEMSIZE = {name: int(name[-2:]) // 8 if name[-2:].isdigit() else int(name[-1]) // 8 if name[-1].isdigit() else 1 for name in DTYPES}
NAMES = ["input", "a", "b", "blob", "x", "", "output", "\x00"]


@dataclass(frozen=True)
class Ref:
    """Out-of-band data in a fuzzed frame: ``content`` placed in the buffer region
    (``offset`` None), or a reference to any ``offset``/``length`` at all."""

    offset: int | None
    length: int
    content: bytes = b""


refs = st.builds(Ref, st.integers(0, 700), st.integers(0, 700))


@st.composite
def tensors(draw):
    """A tensor map: consistent (so it reaches the model), or with any field wrong or missing."""
    dtype = draw(st.sampled_from(list(DTYPES) + BAD_DTYPES + WRONG))
    shape = draw(st.sampled_from(SHAPES + WRONG))
    size = None
    if isinstance(dtype, str) and dtype in ITEMSIZE and isinstance(shape, list) and all(type(d) is int and 0 <= d < 64 for d in shape):
        size = ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64))
    mode = draw(st.integers(0, 5))
    if mode <= 1 and size is not None:
        data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))  # exactly right
        if mode == 1:
            data = Ref(None, len(data), data)
    elif mode == 2:
        data = draw(st.binary(max_size=48))
    elif mode == 3:
        data = draw(st.sampled_from(WRONG))
    else:
        data = draw(refs)
    table = {"dtype": dtype, "shape": shape, "data": data}
    drop = draw(st.integers(0, 7))  # sometimes a field is missing
    if drop < 3:
        del table[("dtype", "shape", "data")[drop]]
    return table


values = st.one_of(tensors(), st.binary(max_size=16), st.sampled_from(WRONG), refs,
                   st.binary(max_size=16).map(lambda b: Ref(None, len(b), b)))
fuzzed_inputs = st.one_of(st.dictionaries(st.sampled_from(NAMES), values, min_size=1, max_size=3), st.sampled_from(WRONG))


def good(dtype: str, shape: list[int]) -> dict:
    array = (np.arange(int(np.prod(shape))) % 2).astype(dtype).reshape(shape)
    return {"dtype": dtype, "shape": shape, "data": array.tobytes()}


# What each test-repository model accepts, so that a share of requests reach the backends.
GOOD_INPUTS = {
    "identity": st.integers(0, 9).map(lambda n: {"input": good("float32", [n, 4])}),
    "echo": st.sampled_from(DTYPES).map(lambda d: {"x": good(d, [2, 3])}),
    "pair": st.integers(0, 5).map(lambda n: {"a": good("float32", [n]), "b": good("int64", [n])}),
    "blob": st.binary(max_size=32).map(lambda b: {"blob": b}),
    "flaky": st.sampled_from([b"raise", b"skip", b"text", b"ok"]).map(lambda b: {"x": b}),
}

OPTIONAL = {
    "version": st.sampled_from([1, 2, 3] + WRONG),
    "timeout_ms": st.sampled_from([0.001, 1, 50, 10_000, 1e12] + WRONG),
    "priority": st.sampled_from([0, 1, 2, 3, 4] + WRONG),
    "outputs": st.sampled_from([["output"], ["a"], ["b", "a"], ["echoed"], ["nope"], ["output", "output"]] + WRONG),
    "unknown_field": st.sampled_from(WRONG),
}


@st.composite
def requests(draw):
    """A request map without its id (the harness adds a fresh valid one).  Each field is
    right most of the time and wrong (any type, any boundary value) some of the time, so
    every layer of validation gets its share of the wrong values."""

    def pick(right, wrong_pool=WRONG, wrong_in_10=2):
        if draw(st.integers(0, 9)) < wrong_in_10:
            return draw(st.sampled_from(wrong_pool))
        return draw(right)

    message = {
        "v": pick(st.just(2), wrong_in_10=1),
        "op": pick(st.sampled_from(["infer"] * 6 + list(OPERATIONS)), WRONG + ["", "Infer", "infer ", "nope"], 1),
    }
    model = pick(st.sampled_from(MODELS), wrong_in_10=1)
    if model is not None or draw(st.booleans()):
        message["model"] = model
    if draw(st.integers(0, 3)):  # mostly with inputs: the deepest validation path
        if isinstance(model, str) and model in GOOD_INPUTS and draw(st.booleans()):
            message["inputs"] = draw(GOOD_INPUTS[model])
        else:
            message["inputs"] = draw(fuzzed_inputs)
    present = draw(st.integers(0, 2 ** len(OPTIONAL) - 1))
    for bit, (key, strategy) in enumerate(OPTIONAL.items()):
        if present >> bit & 1 and draw(st.booleans()):
            message[key] = draw(strategy)
    message["extra"] = draw(st.sampled_from([0, 0, 64, 700]))  # unreferenced region bytes for random refs to hit
    return ("request", message)


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


def packed(value, region: bytearray | None = None) -> bytes:
    """msgpack; a Ref becomes a buffer reference (ext 1), its content appended to ``region``."""

    def reference(obj):
        if not isinstance(obj, Ref):
            raise TypeError(type(obj))
        offset, length = obj.offset, obj.length
        if offset is None and region is not None:
            offset = _align(len(region))
            region.extend(bytes(offset - len(region)) + obj.content)
        return msgpack.ExtType(1, struct.pack(">QQ", offset or 0, length))

    return msgpack.packb(value, use_bin_type=True, default=reference)


def framed(payload: bytes, region: bytes = b"", head: tuple = (0xC1, 2, 0)) -> bytes:
    """A version-2 frame: head, map, padding to 64, buffer region."""
    map_end = 12 + len(payload)
    start = _align(map_end) if region else map_end
    return struct.pack(">IBBHI", start + len(region) - 4, *head, len(payload)) + payload + bytes(start - map_end) + region


def framed_request(message: dict) -> bytes:
    region = bytearray()
    payload = packed({k: v for k, v in message.items() if k != "extra"}, region)
    return framed(payload, bytes(region) + b"\xab" * message.get("extra", 0))


def _expected_for_payload(payload: bytes):
    """Random bytes usually are not one msgpack value (PROTOCOL_ERROR); a map without a valid
    id closes with INVALID_ARGUMENT; one that happens to carry a valid id is a request."""
    try:
        decoded = decode_frame(memoryview(framed(payload)))
    except TrtserveError:
        return {ErrorCode.PROTOCOL_ERROR}
    message = decoded.message if isinstance(decoded, BadFrame) else decoded
    req_id = message.get("id")
    if type(req_id) is int and 0 <= req_id < 2**64:
        return None
    return {ErrorCode.INVALID_ARGUMENT}


@st.composite
def closers(draw):
    """A final frame the server answers with an ``"id": nil`` error and a close:
    (kind, bytes, expected codes; None = whatever happens, as long as the server closes)."""
    kind = draw(st.sampled_from(["bad_id", "not_msgpack", "not_map", "key_type", "huge", "truncated", "head", "raw"]))
    if kind == "bad_id":
        message = draw(requests())[1]
        bad = draw(st.sampled_from(["missing", -1, -(2**63), 1e20, 1.5, "7", None, [], {}, True, b"\x01"]))
        if bad != "missing":
            message["id"] = bad
        return kind, framed_request(message), {ErrorCode.INVALID_ARGUMENT}
    if kind == "not_msgpack":
        payload = draw(st.binary(min_size=1, max_size=64))
        return kind, framed(payload), _expected_for_payload(payload)
    if kind == "not_map":
        value = draw(st.sampled_from([v for v in WRONG if not isinstance(v, dict)]))
        return kind, framed(packed(value)), {ErrorCode.PROTOCOL_ERROR}
    if kind == "key_type":
        return kind, framed(packed({"v": 2, "id": 5, "op": "live", draw(INT64): 1})), {ErrorCode.PROTOCOL_ERROR}
    if kind == "huge":
        length = draw(st.integers(MAX_FRAME + 1, 2**32 - 1))
        return kind, struct.pack(">I", length) + draw(st.binary(max_size=32)), {ErrorCode.FRAME_TOO_LARGE}
    if kind == "truncated":
        whole = framed(packed({"v": 2, "id": 3, "op": "infer", "model": "echo", "inputs": {"x": draw(st.binary(max_size=64))}}))
        cut = draw(st.integers(1, len(whole) - 1))
        return kind, whole[:cut], {ErrorCode.PROTOCOL_ERROR}
    if kind == "head":  # a wrong marker byte, layout or reserved field, or a map past the end
        marker, layout, reserved = draw(st.sampled_from([(0xC0, 2, 0), (0x00, 2, 0), (0xC1, 3, 0), (0xC1, 1, 0), (0xC1, 2, 1)]))
        frame = bytearray(framed(packed({"v": 2, "id": 4, "op": "live"}), head=(marker, layout, reserved)))
        if draw(st.booleans()) and (marker, layout, reserved) == (0xC0, 2, 0):
            frame[4], frame[8:12] = 0xC1, struct.pack(">I", 1 << 20)  # map_length past the frame
        unsupported = marker == 0xC1 and layout != 2 and not reserved
        return kind, bytes(frame), {ErrorCode.UNSUPPORTED_PROTOCOL if unsupported else ErrorCode.PROTOCOL_ERROR}
    return kind, draw(st.binary(max_size=64)), None


bursts = st.tuples(st.lists(requests(), min_size=BURST[0], max_size=BURST[1]), st.none() | closers())


# --------------------------------------------------------------------------- the harness


def outcome(message: dict) -> str:
    return "result" if "result" in message else message["error"]["name"]


def check_well_formed(message: dict) -> None:
    assert isinstance(message, dict) and set(message) in ({"id", "result"}, {"id", "error"}), message
    if "result" in message:
        assert isinstance(message["result"], dict), message
        return
    error = message["error"]
    assert set(error) == {"code", "name", "message", "details"}, error
    assert error["code"] in CODES and error["name"] == ErrorCode(error["code"]).name, error
    assert isinstance(error["message"], str) and isinstance(error["details"], dict), error
    assert error["code"] != ErrorCode.INTERNAL, f"INTERNAL: the server raised unexpectedly: {error}"


class Fuzzer:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.sock: socket.socket | None = None
        self.decoder = FrameDecoder(1 << 30)
        self.ids = itertools.count(1)
        self.frames = self.closed = 0
        self.outcomes: Counter[str] = Counter()  # "result" or the error name, over every response

    def connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=10)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.decoder = FrameDecoder(1 << 30)
        return self.sock

    def drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def read(self) -> list[dict]:
        """What one recv brings; [] at EOF (or a reset, which is how a closed peer may answer)."""
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if not data:
            raise EOFError
        return self.decoder.feed(data)

    def burst(self, requests: list, closer) -> None:
        sock = self.connect()
        sent: set[int] = set()
        chunks = []
        for _, message in requests:
            req_id = next(self.ids)
            sent.add(req_id)
            chunks.append(framed_request({**message, "id": req_id}))
        if closer is not None:
            chunks.append(closer[1])
        sock.sendall(b"".join(chunks))
        self.frames += len(chunks)
        answered: dict[int, dict] = {}
        if closer is None:
            # Every request has a valid id and the connection stays open: each is answered
            # exactly once, in any order (a lost one runs into the socket's 10 s timeout).
            while len(answered) < len(sent):
                for message in self.read():
                    check_well_formed(message)
                    assert message["id"] in sent, message
                    assert message["id"] not in answered, f"answered twice: {message}"
                    answered[message["id"]] = message
                    self.outcomes[outcome(message)] += 1
            return
        kind, _, codes = closer
        sock.shutdown(socket.SHUT_WR)  # a truncated frame is only known to be one at EOF
        received = []
        try:
            while True:
                received += self.read()
        except EOFError:
            pass
        self.drop()
        self.closed += 1
        for message in received:
            check_well_formed(message)
            self.outcomes[outcome(message)] += 1
            assert message["id"] is None or message["id"] in sent, message
        ids = [m["id"] for m in received if m["id"] is not None]
        assert len(ids) == len(set(ids)), f"answered twice: {received}"
        if codes is not None:
            assert received and received[-1]["id"] is None, f"{kind}: no id-nil error before the close: {received[-3:]}"
            assert received[-1]["error"]["code"] in codes, f"{kind}: {received[-1]}"


# --------------------------------------------------------------------------- the test


@pytest.fixture
def repository(tmp_path) -> Path:
    root = build_test_repository(tmp_path / "repo")
    for name in ("gate", "gate_wide"):  # models that block would only make the fuzz wait
        for path in sorted((root / name).rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        (root / name).rmdir()
    return root


def test_fuzzed_frames_never_break_the_server(repository, tmp_path):
    args = ("--max-frame", str(MAX_FRAME), "--log-level", "WARNING")  # no model control: load/unload are refused
    with server_process(repository, tmp_path / "server.log", *args) as proc:
        assert_healthy(proc.host, proc.port)
        baseline = rss_mb(proc.proc.pid)
        fuzzer = Fuzzer(proc.host, proc.port)

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(bursts)
        def fuzz(burst):
            requests, closer = burst
            try:
                fuzzer.burst(requests, closer)
            except BaseException:
                fuzzer.drop()  # the next example starts on a fresh connection
                raise

        try:
            fuzz()
        finally:
            fuzzer.drop()
        assert fuzzer.frames >= MIN_FRAMES, f"only {fuzzer.frames} frames were sent"
        print(f"fuzz: {fuzzer.frames} frames, {fuzzer.closed} connections closed by the server, outcomes {dict(fuzzer.outcomes)}")
        # The fuzz reached past the envelope into every layer: answers, and refusals from the
        # envelope, the operations, the tensor decoder, the models and the framing.
        reached = {"result", "INVALID_ARGUMENT", "UNSUPPORTED_PROTOCOL", "UNKNOWN_OPERATION", "MODEL_NOT_FOUND",
                   "MODEL_UNAVAILABLE", "INVALID_INPUT", "PERMISSION_DENIED", "BACKEND_ERROR", "PROTOCOL_ERROR",
                   "FRAME_TOO_LARGE"}
        assert reached <= set(fuzzer.outcomes), f"never seen: {reached - set(fuzzer.outcomes)}"
        assert fuzzer.outcomes["result"] > 500 and fuzzer.closed > 20, fuzzer.outcomes
        assert_healthy(proc.host, proc.port)
        grown = rss_mb(proc.proc.pid) - baseline
        assert grown < RSS_BOUND_MB, f"server RSS grew {grown:.1f} MiB over the fuzz (bound {RSS_BOUND_MB} MiB)"
        assert proc.proc.poll() is None
    problems = log_problems(proc.log())
    assert not problems, problems[:10]


@pytest.mark.parametrize("dtype", [[1], {}, {"dtype": "float32"}])
def test_unhashable_dtype_is_invalid_input(server_factory, dtype):
    """Found by the fuzz above: a tensor whose dtype is a msgpack array or map made the
    decoder's ``dtype not in _NUMPY_DTYPES`` raise TypeError, answered INTERNAL with a
    traceback in the log, instead of INVALID_INPUT naming the value."""
    handle = server_factory()
    with handle.connect() as conn:
        error = conn.error("infer", model="echo", inputs={"x": {"dtype": dtype, "shape": [1], "data": b"\x00"}})
        assert error["name"] == "INVALID_INPUT" and error["details"].get("where") == "inputs['x']", error
        assert conn.result("live") == {"live": True}
