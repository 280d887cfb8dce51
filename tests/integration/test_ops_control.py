"""Model control modes (none, poll, explicit), reload semantics and served versions, against a
real server on 127.0.0.1 (in-process, and the console script for the flags)."""
from __future__ import annotations

import shutil
import subprocess
import time

import numpy as np
import pytest

from trtserve.errors import ConfigError
from trtserve.server import Server

from .conftest import array, tensor, trtserve_command, write_model

pytestmark = pytest.mark.timeout(60)

ROWS = np.arange(8, dtype=np.float32).reshape(2, 4)
POLL_S = 0.05


def rows_by_name(conn) -> dict[str, dict]:
    return {row["name"]: row for row in conn.result("repository_index")["models"]}


def wait_until(read, check, timeout: float = 10.0):
    give_up = time.monotonic() + timeout
    while not check(value := read()):
        assert time.monotonic() < give_up, f"never satisfied: {value}"
        time.sleep(0.02)
    return value


def wait_for_row(conn, name: str, check) -> dict:
    return wait_until(lambda: rows_by_name(conn).get(name), lambda row: row is not None and check(row))


# --------------------------------------------------------------------------- none


def test_none_mode_loads_everything_and_refuses_control(server_factory):
    handle = server_factory(model_control="none")
    with handle.connect() as conn:
        rows = rows_by_name(conn)
        assert rows["identity"]["state"] == rows["echo"]["state"] == "READY"
        for op in ("load", "unload"):
            error = conn.error(op, model="echo")
            assert error["name"] == "PERMISSION_DENIED" and error["details"] == {"operation": op}
            assert "--model-control none" in error["message"] and "--model-control explicit" in error["message"]
        assert conn.result("ready", model="echo") == {"ready": True}


# --------------------------------------------------------------------------- explicit


def test_explicit_mode_starts_empty_then_loads_and_unloads(server_factory):
    handle = server_factory(model_control="explicit")
    with handle.connect() as conn:
        rows = rows_by_name(conn)
        assert {row["state"] for row in rows.values()} == {"UNLOADED"}
        assert conn.result("ready") == {"ready": True}
        error = conn.error("infer", model="identity", inputs={"input": tensor(ROWS)})  # on disk, not loaded
        assert error["name"] == "MODEL_UNAVAILABLE" and error["details"]["reason"] == "not loaded", error
        assert conn.result("load", model="identity") == {"name": "identity", "version": 2, "state": "READY"}
        out = conn.result("infer", model="identity", inputs={"input": tensor(ROWS)})["outputs"]["output"]
        np.testing.assert_array_equal(array(out), ROWS)
        assert conn.result("unload", model="identity") == {"name": "identity", "state": "UNLOADED"}
        assert conn.error("infer", model="identity", inputs={"input": tensor(ROWS)})["name"] == "MODEL_UNAVAILABLE"
        assert rows_by_name(conn)["identity"]["state"] == "UNLOADED"


def test_explicit_mode_loads_only_the_named_models_at_start(server_factory):
    handle = server_factory(model_control="explicit", load_models=["echo", "broken"])
    with handle.connect() as conn:
        rows = rows_by_name(conn)
        assert rows["echo"]["state"] == "READY"
        assert rows["broken"]["state"] == "UNAVAILABLE" and "NoSuchBackend" in rows["broken"]["reason"]
        assert rows["identity"]["state"] == "UNLOADED"
        assert conn.result("infer", model="echo", inputs={"x": b"e"})["outputs"] == {"output": b"e"}


def test_explicit_mode_star_loads_everything(server_factory):
    handle = server_factory(model_control="explicit", load_models=["*"])
    with handle.connect() as conn:
        assert rows_by_name(conn)["identity"]["state"] == "READY"
        assert conn.result("unload", model="identity")["state"] == "UNLOADED"


@pytest.mark.parametrize(
    "options, key",
    [
        ({"model_control": "explicit", "load_models": ["nope"]}, "load_model"),
        ({"model_control": "none", "allow_model_control": True}, "model_control"),
        ({"allow_model_control": True}, "model_control"),  # the default mode is none
        ({"poll_interval_s": 1.0}, "poll_interval_s"),  # an interval does not choose poll mode
        ({"model_control": "none", "load_models": ["echo"]}, "load_model"),
        ({"model_control": "explicit", "poll_interval_s": 1.0}, "poll_interval_s"),
        ({"model_control": "explicit", "load_models": ["*", "echo"]}, "load_model"),
        ({"model_control": "sometimes"}, "model_control"),
    ],
)
def test_contradictory_control_options_are_refused(repository, server_factory, options, key):
    with pytest.raises(ConfigError) as excinfo:
        if "nope" in options.get("load_models", ()):
            server_factory(**options)  # only the repository can tell the name is unknown
        else:
            Server(repository, **options)
    assert excinfo.value.details["key"] == key


def test_each_mode_resolves_its_own_options(repository):
    plain = Server(repository)
    assert (plain.control.mode, plain.allow_model_control, plain.poll_interval_s) == ("none", False, None)
    every = Server(repository, model_control="explicit", load_models=["*"])
    assert (every.control.mode, every.control.load_models, every.allow_model_control) == ("explicit", ("*",), True)
    polled = Server(repository, model_control="poll", poll_interval_s=0.5)
    assert (polled.control.mode, polled.allow_model_control, polled.poll_interval_s) == ("poll", False, 0.5)
    assert Server(repository, model_control="poll").poll_interval_s == 15.0  # Triton's default


# --------------------------------------------------------------------------- poll


def test_poll_mode_follows_added_changed_and_removed_models(server_factory, repository):
    handle = server_factory(model_control="poll", poll_interval_s=POLL_S)
    with handle.connect() as conn:
        assert conn.error("load", model="echo")["name"] == "PERMISSION_DENIED"
        write_model(repository, "added", 'backend = "Identity"\nmax = 4\n')
        wait_for_row(conn, "added", lambda row: row["state"] == "READY")
        assert conn.result("model_metadata", model="added")["max_batch_size"] == 4
        (repository / "added" / "config.toml").write_text('backend = "Identity"\nmax = 16\n')
        wait_until(lambda: conn.result("model_metadata", model="added")["max_batch_size"], lambda m: m == 16)
        assert conn.result("infer", model="added", inputs={"x": b"a"})["outputs"] == {"output": b"a"}
        shutil.rmtree(repository / "added")
        wait_until(lambda: rows_by_name(conn), lambda rows: "added" not in rows)
        assert conn.error("infer", model="added", inputs={"x": b"a"})["name"] == "MODEL_NOT_FOUND"


def test_poll_mode_keeps_the_old_version_when_the_new_config_is_broken(server_factory, repository):
    handle = server_factory(model_control="poll", poll_interval_s=POLL_S)
    config = repository / "identity" / "config.toml"
    good = config.read_text()
    with handle.connect() as conn:
        config.write_text(good.replace("max = 8", "max = 8\nmax_qeue_size = 4"))
        row = wait_for_row(conn, "identity", lambda row: row["reason"] is not None)
        assert row["state"] == "READY" and row["version"] == 2  # the old version still serves
        assert "max_qeue_size" in row["reason"] and "max_queue_size" in row["reason"]  # the key and the fix
        out = conn.result("infer", model="identity", inputs={"input": tensor(ROWS)})["outputs"]["output"]
        np.testing.assert_array_equal(array(out), ROWS)
        config.write_text(good.replace("max = 8", "max = 6"))  # fixed: the next poll reloads it
        wait_for_row(conn, "identity", lambda row: row["reason"] is None)
        assert conn.result("model_metadata", model="identity")["max_batch_size"] == 6


def test_poll_mode_with_the_legacy_flag_also_allows_control(server_factory):
    handle = server_factory(model_control="poll", poll_interval_s=POLL_S, allow_model_control=True)
    with handle.connect() as conn:
        assert conn.result("unload", model="echo")["state"] == "UNLOADED"
        assert conn.result("load", model="echo")["state"] == "READY"


# --------------------------------------------------------------------------- versions


def two_versions(tmp_path):
    root = tmp_path / "repo"
    write_model(root, "multi", 'backend = "Identity"\nversion_policy = "all"\n', versions=(1, 2))
    write_model(root, "latest", 'backend = "Identity"\n', versions=(1, 3))
    return root


@pytest.mark.parametrize("repository", [two_versions], indirect=True)
def test_metadata_lists_served_versions_and_requests_pick_one(server_factory):
    handle = server_factory(model_control="none")
    with handle.connect() as conn:
        assert conn.result("model_metadata", model="multi")["versions"] == [1, 2]
        assert conn.result("model_metadata", model="latest")["versions"] == [3]
        for version in (1, 2):
            answer = conn.result("infer", model="multi", version=version, inputs={"x": b"v"})
            assert answer["version"] == version
        assert conn.result("infer", model="multi", inputs={"x": b"v"})["version"] == 2
        assert conn.error("infer", model="latest", version=1, inputs={"x": b"v"})["name"] == "VERSION_NOT_FOUND"
        stats = conn.result("statistics", model="multi")["models"]
        assert [(row["version"], row["success_count"]) for row in stats] == [(1, 1), (2, 2)]


# --------------------------------------------------------------------------- the command line


def test_cli_explicit_mode_with_load_model(process_factory):
    proc = process_factory("--model-control", "explicit", "--load-model", "echo", "--log-level", "WARNING")
    with proc.connect() as conn:
        rows = rows_by_name(conn)
        assert (rows["echo"]["state"], rows["identity"]["state"]) == ("READY", "UNLOADED")
        assert conn.result("load", model="identity")["state"] == "READY"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model-control", "none", "--allow-model-control"], "contradicts"),
        (["--model-control", "explicit", "--load-model", "nope"], "--load-model 'nope'"),
        (["--model-control", "none", "--poll-interval", "1"], "applies only to --model-control poll"),
        (["--allow-model-control"], "contradicts --model-control none"),  # none is the default
        (["--poll-interval", "1"], "applies only to --model-control poll"),
        (["--model-control", "poll", "--poll-interval", "0"], "must be > 0"),
    ],
)
def test_cli_refuses_contradictory_flags(repository, args, message):
    done = subprocess.run(trtserve_command() + ["serve", "--repository", str(repository), "--port", "0", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stdout == ""
