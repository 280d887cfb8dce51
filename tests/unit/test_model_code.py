"""Hostile and broken model code in the repository: a model's backend.py is private to it
(it cannot replace built-ins or another model's backends), anything it or an init raises
makes only that model UNAVAILABLE, a hung init is bounded by ``load_timeout`` and delays no
other model, and unloading releases the module."""
from __future__ import annotations

import gc
import sys
import threading
import time
import weakref

import pytest

import trtserve
from trtserve.backend import backend_class, registered_names
from trtserve.errors import ConfigError, ModelUnavailableError, TrtserveError
from trtserve.loadjob import LoadJob, load_timeout
from trtserve.modelcode import load_model_code

from test_repository import infer, make_model
from test_repository import repo as repo  # a fixture: `as` marks the re-export

ECHO = """
import trtserve

class {name}(trtserve.Backend):
    def forward(self, items):
        for item in items:
            item["result"] = ({tag!r}, item["data"])

trtserve.register({name!r}, {name})
"""
HANGS = """
import time, trtserve

class Sleepy(trtserve.Backend):
    def init(self, context):
        super().init(context)
        time.sleep(float(open(__file__.replace("backend.py", "sleep")).read()))

    def forward(self, items):
        for item in items:
            item["result"] = item["data"]

trtserve.register("Sleepy", Sleepy)
"""
LEAVES_AT_IMPORT = "import sys\nsys.exit(3)\n"
LEAVES_IN_INIT = """
import trtserve

class Leaver(trtserve.Backend):
    def init(self, context):
        raise KeyboardInterrupt("from a model's init")

trtserve.register("Leaver", Leaver)
"""


def test_a_backend_py_cannot_replace_a_built_in(tmp_path, repo):
    make_model(tmp_path, "identity", 'backend = "Identity"\n', backend="")
    make_model(tmp_path, "hijack", 'backend = "Identity"\n', backend=ECHO.format(name="Identity", tag="hijacked"))
    repo.load_all()
    states = {row["name"]: row for row in repo.index()}
    assert states["hijack"]["state"] == "UNAVAILABLE"
    assert "registers 'Identity', the name of a built-in backend" in states["hijack"]["reason"]
    assert "'MyIdentity'" in states["hijack"]["reason"]
    assert infer(repo.get("identity"), 5) == 5  # the built-in, not the hijacker's code
    assert backend_class("Identity").__module__ == "trtserve.backends.identity"


def test_each_model_sees_only_its_own_backends(tmp_path, repo):
    make_model(tmp_path, "a", 'backend = "Echo"\n', backend=ECHO.format(name="Echo", tag="a"))
    make_model(tmp_path, "b", 'backend = "Echo"\n', backend=ECHO.format(name="Echo", tag="b"))
    make_model(tmp_path, "c", 'backend = "Echo"\n', backend="")  # registers nothing
    repo.load_all()
    assert infer(repo.get("a"), 1) == ("a", 1) and infer(repo.get("b"), 1) == ("b", 1)
    repo.load("b")  # a reload of b changes nothing for a
    assert infer(repo.get("a"), 2) == ("a", 2)
    reason = {row["name"]: row["reason"] for row in repo.index()}["c"]
    assert "unknown backend 'Echo'" in reason
    assert "Echo" not in registered_names()  # nothing leaked into the process-wide registry


@pytest.mark.parametrize("code, raised", [(LEAVES_AT_IMPORT, "SystemExit: 3"), (LEAVES_IN_INIT, "KeyboardInterrupt")])
def test_system_exit_or_keyboard_interrupt_from_model_code_is_that_models_failure(tmp_path, repo, code, raised):
    make_model(tmp_path, "good", 'backend = "Echo"\n', backend=ECHO.format(name="Echo", tag="g"))
    make_model(tmp_path, "leaver", 'backend = "Leaver"\n', backend=code)
    repo.load_all()
    row = {r["name"]: r for r in repo.index()}["leaver"]
    assert row["state"] == "UNAVAILABLE" and raised in row["reason"], row
    assert infer(repo.get("good"), 3) == ("g", 3)
    with pytest.raises(TrtserveError, match=raised):
        repo.load("leaver")  # at run time too: a typed error (CONFIG_ERROR, MODEL_UNAVAILABLE), never an exit


def test_a_hung_init_is_unavailable_after_load_timeout_and_delays_no_other_model(tmp_path, repo):
    folder = make_model(tmp_path, "sleepy", 'backend = "Sleepy"\nload_timeout = 0.5\n', backend=HANGS)
    (folder / "sleep").write_text("3")
    for name in ("a", "b", "c", "d", "e"):  # more than the loads that run at once
        make_model(tmp_path, name, 'backend = "Echo"\n', backend=ECHO.format(name="Echo", tag=name))
    started = time.monotonic()
    repo.load_all()
    assert time.monotonic() - started < 2.5  # the hung one cost its 0.5 s, not 3 s, and no one else's turn
    row = {r["name"]: r for r in repo.index()}["sleepy"]
    assert row["state"] == "UNAVAILABLE" and "did not finish loading within load_timeout = 0.5 s" in row["reason"]
    assert all(infer(repo.get(name), 0) == (name, 0) for name in "abcde")
    with pytest.raises(ModelUnavailableError, match="an earlier load timed out and is still running"):
        repo.load("sleepy")
    time.sleep(3)  # the abandoned load ends and throws its pipeline away
    (folder / "sleep").write_text("0")
    assert infer(repo.load("sleepy"), 9) == 9


@pytest.mark.parametrize("bad", [0, -1, "10", True, float("inf")])
def test_a_bad_load_timeout_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="load_timeout = .* must be a number of seconds > 0"):
        load_timeout({"load_timeout": bad}, "m/config.toml")
    assert load_timeout({}, "m/config.toml") == 600.0


def test_an_abandoned_load_discards_what_it_builds():
    finish, discarded = threading.Event(), []
    job = LoadJob("slow", lambda: (finish.wait(5), "built")[1], discarded.append)
    with pytest.raises(ModelUnavailableError, match="within load_timeout = 0.05 s"):
        job.run(0.05)
    assert job.running
    finish.set()
    job.thread.join(5)
    assert discarded == ["built"] and not job.running


def test_unloading_releases_the_module_and_what_it_held(tmp_path, repo):
    make_model(tmp_path, "weights", 'backend = "Heavy"\n', backend="""
import trtserve

class Weights:  # module-level data, as a model's tables or weights would be
    pass

WEIGHTS = Weights()

class Heavy(trtserve.Backend):
    def forward(self, items):
        for item in items:
            item["result"] = item["data"]

trtserve.register("Heavy", Heavy)
""")
    repo.load("weights")
    code = repo._entries["weights"].code
    module = code.module
    held, name = weakref.ref(module.WEIGHTS), module.__name__
    assert name in sys.modules
    repo.unload("weights")
    assert code.module is None and name not in sys.modules and not vars(module)
    gc.collect()
    assert held() is None


def test_load_model_code_without_a_backend_py_is_empty(tmp_path):
    code = load_model_code("plain", tmp_path)
    assert code.module is None and code.classes == {}
    with code.scope():
        trtserve.register("OnlyHere", trtserve.Backend)
        assert backend_class("OnlyHere") is trtserve.Backend
    assert "OnlyHere" not in registered_names()
