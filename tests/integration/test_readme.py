"""README.md's code blocks (and docs/server.md's client snippet) run as written and print
what the documents say they print.

The client snippet runs against ``trtserve serve`` started with the README's own command
line (on an ephemeral port instead of 8001), the in-process snippet from the repository's
root, the load generator's command against the same server; the TOML block is the
example's own file.
"""
from __future__ import annotations

import csv
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .doc_support import PORT, ROOT, blocks, run_python, start_server, the_block

README = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory):
    """The server as the README starts it: its own command line, port 0 instead of 8001."""
    serve = the_block(README, "bash", "trtserve serve")[0].strip().split(" && ")[-1]
    args = shlex.split(serve)
    assert args[0] == "trtserve"
    proc = start_server([str(ROOT / a) if a == "model_repository" else a for a in args[1:]],
                        tmp_path_factory.mktemp("readme") / "trtserve.log")
    assert proc.host == "127.0.0.1", "the README says the server listens on 127.0.0.1"
    yield proc
    proc.close()


def test_the_two_commands_are_the_documented_ones():
    commands = [code.strip() for _, code, _ in blocks(README, "bash")]
    assert ("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
            "trtserve serve --repository model_repository") in commands
    assert "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test,ray]' && pytest tests" in commands


def test_every_python_block_states_its_output():
    python = blocks(README, "python")
    assert len(python) >= 2
    assert all(output is not None for _, _, output in python), "follow each ```python block with a ```text block of its output"


def test_the_client_snippet_prints_what_the_readme_says(readme_server, tmp_path):
    code, output = the_block(README, "python", "Client(")
    assert run_python(code, tmp_path, port=readme_server.port) == output


def test_the_in_process_snippet_prints_what_the_readme_says():
    code, output = the_block(README, "python", "trtserve.pipe(")
    assert run_python(code, ROOT) == output


def test_the_config_shown_is_the_examples_own():
    code, _ = the_block(README, "toml", "[preprocess]")
    path = re.match(r"# (\S+):", code).group(1)
    shown, actual = tomllib.loads(code), tomllib.loads((ROOT / path).read_text())
    assert shown and all(actual[table] == keys for table, keys in shown.items())


def test_the_load_generator_command_runs_against_the_server(readme_server, tmp_path):
    command = the_block(README, "bash", "trtserve-bench")[0].strip()
    args = shlex.split(command.replace(f"--port {PORT}", f"--port {readme_server.port}"))
    assert args[0] == "trtserve-bench" and str(readme_server.port) in args
    script = Path(sys.executable).with_name("trtserve-bench")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "trtserve_bench.cli"]
    done = subprocess.run(argv + args[1:], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    levels = args[args.index("--concurrency") + 1].split(",")
    with open(tmp_path / args[args.index("--csv") + 1], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(levels) and all(float(r["errors"]) == 0 and float(r["throughput"]) > 0 for r in rows)


def test_the_shared_memory_snippet_of_the_server_guide(readme_server, tmp_path):
    code, output = the_block((ROOT / "docs" / "server.md").read_text(), "python", "register_system_shm")
    assert run_python(code, tmp_path, port=readme_server.port) == output
