"""Running a document's code blocks: find them, run a Python one, start the server it talks to.

A ```python block followed by a ```text block (nothing but a word such as "prints" between
them) claims that output; the tests compare it exactly.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .conftest import ServerProcess, trtserve_command

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
PORT = "8001"  # the port the documents' commands and snippets use


def blocks(text: str, lang: str | None = None) -> list[tuple[str, str, str | None]]:
    """(lang, code, the output block right after it or None), in document order."""
    found = [(m.group(1), m.group(2), m.start(), m.end()) for m in BLOCK.finditer(text)]
    out = []
    for i, (kind, code, _, end) in enumerate(found):
        following = found[i + 1] if i + 1 < len(found) else None
        output = None
        if following is not None and following[0] == "text" and len(text[end:following[2]].split()) <= 1:
            output = following[1]
        if lang is None or kind == lang:
            out.append((kind, code, output))
    return out


def the_block(text: str, lang: str, needle: str) -> tuple[str, str | None]:
    """The one ``lang`` block containing ``needle``, and its stated output."""
    [(_, code, output)] = [b for b in blocks(text, lang) if needle in b[1]]
    return code, output


def run_python(code: str, cwd: Path, port: int | None = None) -> str:
    """Run a snippet in a fresh interpreter; with ``port``, the documents' 8001 becomes it."""
    if port is not None:
        assert f'"127.0.0.1", {PORT}' in code
        code = code.replace(f'"127.0.0.1", {PORT}', f'"127.0.0.1", {port}')
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def start_server(args: list[str], log_path: Path) -> ServerProcess:
    """``trtserve <args> --port 0``: a documented command line on an ephemeral port."""
    assert args[0] == "serve" and "--port" not in args
    proc = ServerProcess(ROOT, log_path=log_path)
    proc.argv = trtserve_command() + args + ["--port", "0"]
    return proc.start()
