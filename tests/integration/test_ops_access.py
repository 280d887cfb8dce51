"""Access control and limits against a real server on 127.0.0.1: the shared token (auth
operation), TLS, the connection limit, the pre-auth frame limit, disabled model control."""
from __future__ import annotations

import shutil
import ssl
import struct
import subprocess
import time

import numpy as np
import pytest
from trtserve_client import Client
from trtserve_client.errors import (
    ConnectionFailedError,
    ErrorCode,
    PermissionDeniedError,
    UnauthenticatedError,
)

from trtserve.errors import ConfigError
from trtserve.server.auth import read_token_file, server_ssl_context

from .ops_support import assert_cli_refuses

pytestmark = pytest.mark.timeout(60)

TOKEN = "access-test-token-0123456789abcdef"
X = np.arange(4, dtype=np.float32).reshape(1, 4)


@pytest.fixture
def guarded(server_factory):
    return server_factory(token=TOKEN)


def authed(handle):
    conn = handle.connect()
    assert conn.result("auth", token=TOKEN) == {"authenticated": True, "required": True}
    return conn


def assert_refused(conn, request_id, code: str) -> dict:
    """The server answers ``code`` (for ``request_id``, or nil) and closes the connection."""
    message = conn.recv()
    assert message["id"] == request_id and message["error"]["name"] == code, message
    conn.assert_closed()
    return message["error"]


def wait_connections(handle, count: int, timeout: float = 10.0) -> None:
    tracker = handle.server.tracker
    give_up = time.monotonic() + timeout
    while handle.call(lambda: len(tracker.connections)) != count:
        assert time.monotonic() < give_up, f"never {count} connections"
        time.sleep(0.01)


# --------------------------------------------------------------------------- the token


def test_a_request_before_auth_is_refused_and_the_connection_closed(guarded):
    with guarded.connect() as conn:
        error = assert_refused(conn, conn.request("live"), "UNAUTHENTICATED")
    assert "auth" in error["message"] and "token=" in error["message"]


@pytest.mark.parametrize("fields", [{"token": "wrong-token-0123456789abcdef"}, {}, {"token": 42}, {"token": TOKEN[:-1]}])
def test_a_wrong_or_missing_token_is_refused(guarded, fields):
    with guarded.connect() as conn:
        error = assert_refused(conn, conn.request("auth", **fields), "UNAUTHENTICATED")
    assert TOKEN not in error["message"]  # the secret never travels back


def test_the_right_token_opens_the_connection(guarded):
    with authed(guarded) as conn:
        assert conn.result("live") == {"live": True}
        out = conn.result("infer", model="echo", inputs={"x": b"ok"})["outputs"]
        assert out == {"output": b"ok"}
        assert conn.result("auth", token=TOKEN)["authenticated"] is True  # again: still fine
        big = {"x": b"\0" * (256 * 1024)}  # over the pre-auth frame limit, fine after auth
        assert conn.result("infer", model="echo", inputs=big)["outputs"]["output"] == big["x"]


def test_a_token_as_bytes_is_accepted(guarded):
    with guarded.connect() as conn:
        assert conn.result("auth", token=TOKEN.encode())["required"] is True


def test_frames_before_auth_are_small(guarded):
    with guarded.connect() as conn:
        conn.send_bytes(struct.pack(">I", 1 << 20))
        error = assert_refused(conn, None, "FRAME_TOO_LARGE")
    assert "before authentication" in error["message"] and error["details"]["max_frame"] == 64 * 1024


def test_a_silent_connection_is_closed_after_the_auth_timeout(server_factory):
    handle = server_factory(token=TOKEN, auth_timeout_s=0.2)
    with handle.connect() as conn:
        error = assert_refused(conn, None, "UNAUTHENTICATED")
    assert "0.2 s" in error["message"]
    wait_connections(handle, 0)


def test_without_a_token_auth_is_accepted_and_not_required(server_factory):
    handle = server_factory()
    with handle.connect() as conn:
        assert conn.result("auth", token="anything") == {"authenticated": True, "required": False}
        assert conn.result("live") == {"live": True}


def test_the_client_sends_its_token_on_every_new_connection(guarded):
    with Client(guarded.host, guarded.port, token=TOKEN, timeout=10) as client:
        assert client.infer("echo", b"first") == {"output": b"first"}
        tracker = guarded.server.tracker
        guarded.call(lambda: [conn.abort() for conn in list(tracker.connections)])  # the link drops
        connection = client._async.connections[0]
        give_up = time.monotonic() + 10
        while connection.connected:  # the client has seen the drop: the next call reconnects
            assert time.monotonic() < give_up, "the client never saw the connection drop"
            time.sleep(0.01)
        assert client.infer("echo", b"again") == {"output": b"again"}  # reconnected and re-authenticated
        assert connection.connected


def test_the_client_without_or_with_a_wrong_token_gets_unauthenticated(guarded):
    for token in (None, "wrong-token-0123456789abcdef"):
        with Client(guarded.host, guarded.port, token=token, timeout=10) as client:
            with pytest.raises(UnauthenticatedError) as excinfo:
                client.live()
            assert excinfo.value.code == ErrorCode.UNAUTHENTICATED


def test_tokens_that_are_too_short_are_refused(server_factory, tmp_path):
    with pytest.raises(ConfigError, match="at least 16"):
        server_factory(token="short")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert read_token_file(token_file) == TOKEN.encode()  # the trailing newline is not part of it


# --------------------------------------------------------------------------- limits


def test_load_and_unload_are_refused_while_disabled(guarded):
    with Client(guarded.host, guarded.port, token=TOKEN, timeout=10) as client:
        for operation in (client.load, client.unload):
            with pytest.raises(PermissionDeniedError, match="--model-control explicit"):
                operation("echo")
        assert client.ready("echo") is True


def test_connections_over_the_limit_are_refused(server_factory, gates):
    handle = server_factory(max_connections=2)
    first, second = handle.connect(), handle.connect()
    try:
        # Both busy (a request in flight each): no slot can be freed, the third is refused.
        held = [conn.request("infer", model="gate_wide", inputs={"x": b"held"}) for conn in (first, second)]
        gates["gate_wide"].wait_started(2)
        with handle.connect() as third:
            error = assert_refused(third, None, "RESOURCE_EXHAUSTED")
        assert error["details"] == {"max_connections": 2} and "--max-connections" in error["message"]
        assert "none of them idle" in error["message"]
        with Client(handle.host, handle.port, timeout=10) as client:
            with pytest.raises(ConnectionFailedError) as excinfo:
                client.live()
            assert excinfo.value.details["cause_code"] == ErrorCode.RESOURCE_EXHAUSTED
        gates["gate_wide"].open()
        assert first.recv()["id"] == held[0] and second.recv()["id"] == held[1]
        assert second.result("live") == {"live": True}  # first is now the one idle the longest
        # Both idle: a new connection takes the slot of the one idle the longest.
        with handle.connect() as again:
            assert again.result("live") == {"live": True}
            evicted = first.recv()
            assert evicted["id"] is None and evicted["error"]["name"] == "RESOURCE_EXHAUSTED", evicted
            assert "longest idle" in evicted["error"]["message"]
            first.assert_closed()
            assert second.result("live") == {"live": True}
    finally:
        first.close()
        second.close()


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (the cryptography package is not installed here)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("neither the cryptography package nor the openssl command is available to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return cert, key


def test_tls_round_trip_with_a_token(server_factory, certificate):
    cert, key = certificate
    handle = server_factory(token=TOKEN, ssl_context=server_ssl_context(cert, key))
    with Client(handle.host, handle.port, tls=True, ca_file=str(cert), token=TOKEN, timeout=10) as client:
        np.testing.assert_array_equal(client.infer("identity", X)["output"], X)
        big = np.random.default_rng(0).bytes(2 << 20)  # large frames both ways stay encrypted (writer.py)
        assert client.infer("blob", {"blob": big})["echoed"] == big
    context = ssl.create_default_context(cafile=str(cert))
    with Client(handle.host, handle.port, ssl=context, token=TOKEN, timeout=10) as client:
        assert client.infer("echo", b"tls") == {"output": b"tls"}
    with Client(handle.host, handle.port, tls=True, token=TOKEN, timeout=10) as client:
        with pytest.raises(ConnectionFailedError, match="CERTIFICATE_VERIFY_FAILED"):
            client.live()  # the system's CAs did not sign a self-signed certificate
    with Client(handle.host, handle.port, token=TOKEN, timeout=10, connect_timeout=5) as client:
        with pytest.raises(ConnectionFailedError):
            client.live()  # plain TCP to a TLS port


def test_tls_files_that_do_not_exist_are_config_errors(tmp_path, certificate):
    with pytest.raises(ConfigError, match="--tls-key"):
        server_ssl_context(certificate[0], tmp_path / "missing.pem")


def test_cli_token_file_and_tls(process_factory, certificate, tmp_path):
    cert, key = certificate
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    proc = process_factory("--token-file", str(token_file), "--tls-cert", str(cert), "--tls-key", str(key),
                           "--log-level", "WARNING")
    with Client(proc.host, proc.port, tls=True, ca_file=str(cert), token=TOKEN, timeout=10) as client:
        assert client.infer("echo", b"cli") == {"output": b"cli"}
    with Client(proc.host, proc.port, tls=True, ca_file=str(cert), token="wrong-token-0123456789abcdef", timeout=10) as client:
        with pytest.raises(UnauthenticatedError):
            client.live()


@pytest.mark.parametrize("args, message", [
    (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
    (["--token-file", "missing-token"], "--token-file"),
    (["--max-connections", "0"], "positive integer"),
])
def test_cli_refuses_bad_access_flags(repository, tmp_path, args, message):
    assert_cli_refuses(repository, tmp_path, args, message)
