"""Access control: the shared token checked by the ``auth`` operation, and TLS contexts.

With a token configured, the first request on every connection must be
``{"op": "auth", "token": <str or bin>}``.  Anything else before it, a wrong token, or no
``auth`` within ``auth_timeout_s`` of connecting is answered UNAUTHENTICATED and the
connection is closed (server/protocol.py enforces the order; this module decides).  Until
then a connection may only send frames of up to ``PRE_AUTH_MAX_FRAME`` bytes, so an
unauthenticated peer cannot make the server buffer a 64 MiB frame.

Tokens are compared with ``hmac.compare_digest`` (constant time) and never appear in
messages or logs.
"""
from __future__ import annotations

import hmac
import logging
import os
import ssl
import stat
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UnauthenticatedError

log = logging.getLogger("trtserve.server")

DEFAULT_AUTH_TIMEOUT_S = 10.0  # an idle unauthenticated connection must not hold a slot for long
PRE_AUTH_MAX_FRAME = 64 * 1024  # an auth request is tiny; nothing bigger is read before it succeeds
MIN_TOKEN_BYTES = 16
TOKEN_HINT = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def token_bytes(token: str | bytes) -> bytes:
    """A token as the bytes that are compared; too short a token is refused."""
    raw = token.encode() if isinstance(token, str) else bytes(token)
    if len(raw) < MIN_TOKEN_BYTES:
        raise ConfigError(
            f"the access token has {len(raw)} bytes; use at least {MIN_TOKEN_BYTES} random bytes ({TOKEN_HINT})",
            key="token",
        )
    return raw


def read_token_file(path: str | Path) -> bytes:
    """The token in ``path`` (surrounding whitespace, e.g. a trailing newline, is ignored)."""
    path = Path(path)
    try:
        raw = path.read_bytes().strip()
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"--token-file {path}: cannot read it ({exc.strerror or exc})", key="token_file", path=str(path)) from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("token file %s is readable by other users; chmod 600 it", path)
    return token_bytes(raw)


class Authenticator:
    """Checks ``auth`` requests against the server's token."""

    def __init__(self, token: str | bytes) -> None:
        self._token = token_bytes(token)

    def check(self, message: dict[str, Any]) -> None:
        token = message.get("token")
        if isinstance(token, str):
            token = token.encode()
        if not isinstance(token, bytes):
            raise UnauthenticatedError(
                f"field 'token' must be the server's access token (str or bin), got {type(token).__name__}; "
                "pass token= to the client (the server's --token-file holds it)",
                field="token",
            )
        if not hmac.compare_digest(token, self._token):
            raise UnauthenticatedError(
                "wrong access token; use the token in the server's --token-file (the client's token=)",
                field="token",
            )


def server_ssl_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2 or later) from a PEM certificate chain and its key."""
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not os.path.isfile(path):
            raise ConfigError(f"{flag} {path}: no such file; give a PEM file", key=flag.lstrip("-"), path=str(path))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"--tls-cert {cert} / --tls-key {key}: cannot load them ({exc}); give a PEM certificate and its "
            "matching unencrypted private key",
            key="tls_cert",
        ) from None
    return context
