"""Model repository: states, versions and policies, hot reload, warmup, poll mode, leaks."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from trtserve.errors import ConfigError, ModelNotFoundError, ModelUnavailableError, VersionNotFoundError
from trtserve.repository import ModelRepository

TAGGED = """
import trtserve

class Tagged(trtserve.Backend):
    config_keys = {"tag": trtserve.Key(str, ""), "fail_warmup": trtserve.Key(bool, False)}

    def init(self, context):
        super().init(context)
        self.version = context.version

    def forward(self, items):
        for item in items:
            if self.config["fail_warmup"]:
                raise RuntimeError("this model cannot run")
            item["result"] = (self.version, self.config["tag"], item["data"])

trtserve.register("Tagged", Tagged)
"""


def make_model(root: Path, name: str, config: str, versions=(1,), backend: str = TAGGED) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for version in versions:
        (folder / str(version)).mkdir(exist_ok=True)
    (folder / "backend.py").write_text(backend)
    (folder / "config.toml").write_text(config)
    return folder


def infer(model, data, timeout=10):
    done, out = threading.Event(), {}
    model.submit({"data": data}, lambda item, err: (out.update(item=item, err=err), done.set()))
    assert done.wait(timeout)
    if out["err"] is not None:
        raise out["err"]
    return out["item"]["result"]


@pytest.fixture
def repo(tmp_path):
    repository = ModelRepository(tmp_path)
    yield repository
    repository.close()


def test_bad_models_are_unavailable_with_reasons_and_the_rest_serve(tmp_path, repo):
    make_model(tmp_path, "good", 'backend = "Tagged"\ntag = "g"\n')
    make_model(tmp_path, "typo", 'backend = "Taged"\n')
    make_model(tmp_path, "nofile", 'backend = "Tagged"\nmodel = "weights.bin"\n')
    repo.load_all()
    states = {row["name"]: (row["state"], row["reason"]) for row in repo.index()}
    assert states["good"] == ("READY", None)
    assert states["typo"][0] == "UNAVAILABLE" and "did you mean 'Tagged'" in states["typo"][1]
    assert states["nofile"][0] == "UNAVAILABLE" and "weights.bin" in states["nofile"][1]
    assert infer(repo.get("good"), 7) == (1, "g", 7)
    with pytest.raises(ModelUnavailableError, match="UNAVAILABLE"):
        repo.get("typo")
    with pytest.raises(ModelNotFoundError):
        repo.get("ghost")
    with pytest.raises(ModelNotFoundError, match="repository_index lists the models") as missing:
        repo.load("ghost")
    assert str(tmp_path) not in missing.value.message and "good" not in missing.value.message  # no disk details
    with pytest.raises(ConfigError):
        ModelRepository(tmp_path / "not-a-dir")


@pytest.mark.parametrize(
    "policy, served",
    [("", [3]), ('version_policy = { latest = 2 }\n', [2, 3]), ('version_policy = "all"\n', [1, 2, 3]),
     ('version_policy = { specific = [1, 3] }\n', [1, 3])],
)
def test_version_policy(tmp_path, repo, policy, served):
    make_model(tmp_path, "m", policy + 'backend = "Tagged"\n', versions=(1, 2, 3))
    repo.load("m")
    assert repo.index()[0]["versions"] == served
    assert infer(repo.get("m"), 0)[0] == max(served)
    for version in served:
        assert infer(repo.get("m", version), 0)[0] == version
    missing = ({1, 2, 3} - set(served)) or {9}
    with pytest.raises(VersionNotFoundError) as info:
        repo.get("m", min(missing))
    assert info.value.details["served"] == served


def test_model_files_resolve_in_each_version_folder(tmp_path, repo):
    folder = make_model(tmp_path, "m", 'version_policy = "all"\nbackend = "Tagged"\nmodel = "weights.bin"\n', versions=(1, 2))
    (folder / "1" / "weights.bin").write_bytes(b"one")
    (folder / "2" / "weights.bin").write_bytes(b"two")
    repo.load("m")
    for version in (1, 2):
        assert repo.get("m", version).config.entry.options["model"] == str((folder / str(version) / "weights.bin").resolve())
    (folder / "2" / "weights.bin").unlink()
    with pytest.raises(ConfigError, match="weights.bin"):
        repo.load("m")


@pytest.mark.parametrize("policy", ['"newest"', "{ latest = 0 }", "{ specific = [] }", "{ latest = 1, all = 2 }"])
def test_bad_version_policy(tmp_path, repo, policy):
    make_model(tmp_path, "m", f'version_policy = {policy}\nbackend = "Tagged"\n')
    with pytest.raises(ConfigError, match="version_policy .* is not valid"):
        repo.load("m")


def test_failed_reload_keeps_the_old_version_serving(tmp_path, repo):
    folder = make_model(tmp_path, "m", 'backend = "Tagged"\ntag = "old"\n')
    repo.load("m")
    (folder / "config.toml").write_text('backend = "Tagged"\ntag = 3\n')
    with pytest.raises(ConfigError):
        repo.load("m")
    row = repo.index()[0]
    assert row["state"] == "READY" and "tag must be a string" in row["reason"]
    assert infer(repo.get("m"), 1) == (1, "old", 1)


def test_reload_under_load_loses_nothing_and_answers_from_live_versions(tmp_path, repo):
    folder = make_model(tmp_path, "m", 'backend = "Tagged"\ntag = "v0"\nmax = 4\nbatching_timeout = 1\n')
    repo.load("m")
    live = {"v0"}
    stop = threading.Event()
    answers, errors = [], []

    def client(cid):
        n = 0
        while not stop.is_set():
            sent_while_live = set(live)
            try:
                version, tag, data = infer(repo.get("m"), (cid, n))
            except Exception as exc:  # surfaced below
                errors.append(exc)
                return
            answers.append((tag, sent_while_live, data == (cid, n)))
            n += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for generation in range(1, 11):
        (folder / "config.toml").write_text(f'backend = "Tagged"\ntag = "v{generation}"\nmax = 4\nbatching_timeout = 1\n')
        live.add(f"v{generation}")
        repo.load("m")
        live.discard(f"v{generation - 1}") if generation > 1 else None
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert len(answers) > 100
    assert all(correct for _, _, correct in answers)
    generation = lambda tag: int(tag[1:])  # noqa: E731
    for tag, sent_live, _ in answers:
        # A version live at send time, or its successor when the request raced the swap.
        assert tag in sent_live or generation(tag) == max(map(generation, sent_live)) + 1, (tag, sent_live)


def test_warmup_runs_before_ready_and_a_failing_warmup_makes_the_model_unavailable(tmp_path, repo):
    warm = '\n[[warmup]]\ncount = 3\n[warmup.inputs.x]\ndtype = "float32"\nshape = [1, 4]\nfill = "random"\n'
    make_model(tmp_path, "warm", 'backend = "Tagged"\n' + warm)
    make_model(tmp_path, "cold", 'backend = "Tagged"\nfail_warmup = true\n' + warm)
    repo.load_all()
    stats = repo.get("warm").statistics()
    assert stats["success_count"] == 0  # warm-up runs on the instances: it is not traffic
    row = {r["name"]: r for r in repo.index()}["cold"]
    assert row["state"] == "UNAVAILABLE" and "warmup sample 0 failed in node 'cold'" in row["reason"]
    assert "this model cannot run" in row["reason"]


@pytest.mark.parametrize(
    "warmup, fragment",
    [
        ('[[warmup]]\ncount = 0\n[warmup.inputs.x]\ndtype = "uint8"\nshape = [1]\n', "count must be an integer >= 1"),
        ("[[warmup]]\ncount = 1\n", "needs at least one"),
        ('[[warmup]]\nbatch_sizes = [0]\n[warmup.inputs.x]\ndtype = "uint8"\nshape = [1]\n', "batch_sizes must be a list"),
        ('[[warmup]]\nbatch_sizes = 4\n[warmup.inputs.x]\ndtype = "uint8"\nshape = [1]\n', "batch_sizes must be a list"),
        ('[[warmup]]\n[warmup.inputs.x]\ndtype = "int3"\nshape = [1]\n', "dtype = 'int3'"),
        ('[[warmup]]\n[warmup.inputs.x]\ndtype = "uint8"\nshape = [0]\n', "concrete positive integers"),
        ('[[warmup]]\n[warmup.inputs.x]\nfile = "nope.jpg"\n', "does not exist"),
        ('[[warmup]]\n[warmup.inputs.x]\ndtype = "uint8"\nshape = [1]\nfill = "ones"\n', "fill = 'ones'"),
        ('[[warmup]]\nrepeat = 2\n', "unknown key warmup[0].repeat"),
    ],
)
def test_warmup_config_errors(tmp_path, repo, warmup, fragment):
    make_model(tmp_path, "m", 'backend = "Tagged"\n' + warmup)
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        repo.load("m")


def test_poll_loads_added_reloads_changed_unloads_removed(tmp_path, repo):
    make_model(tmp_path, "a", 'backend = "Tagged"\ntag = "a1"\n')
    assert repo.poll()["loaded"] == ["a"]
    assert repo.poll() == {"loaded": [], "unloaded": [], "reloaded": [], "failed": []}
    folder_b = make_model(tmp_path, "b", 'backend = "Taged"\n')
    assert repo.poll()["failed"] == ["b"]
    assert repo.poll()["failed"] == [], "unchanged broken files are not retried every poll"
    (folder_b / "config.toml").write_text('backend = "Tagged"\ntag = "b"\n')
    assert repo.poll()["loaded"] == ["b"]
    config_a = tmp_path / "a" / "config.toml"
    config_a.write_text('backend = "Tagged"\ntag = "a2"\n')
    os.utime(config_a, ns=(time.time_ns(), time.time_ns() + 10**9))  # coarse mtime clocks
    assert repo.poll()["reloaded"] == ["a"]
    assert infer(repo.get("a"), 0)[1] == "a2"
    import shutil

    shutil.rmtree(tmp_path / "b")
    assert repo.poll()["unloaded"] == ["b"]
    with pytest.raises(ModelNotFoundError):
        repo.get("b")


def test_unload_finishes_accepted_work_and_load_unload_cycles_do_not_leak(tmp_path, repo):
    make_model(tmp_path, "m", 'backend = "Tagged"\ninstance_num = 2\n')
    repo.load("m")
    assert infer(repo.get("m"), 1)[2] == 1
    repo.unload("m")
    with pytest.raises(ModelUnavailableError, match="UNLOADED"):
        repo.get("m")
    with pytest.raises(ModelNotFoundError):
        repo.unload("m")
    threads_before = threading.active_count()
    for _ in range(50):
        repo.load("m")
        repo.unload("m")
    assert threading.active_count() <= threads_before + 1  # every instance and timer thread joined


def test_generated_files_do_not_look_like_model_changes(tmp_path):
    from trtserve.versions import fingerprint

    folder = make_model(tmp_path, "m", 'backend = "Tagged"\n')
    before = fingerprint(folder)
    (folder / "1" / "model.onnx.trtcache").write_bytes(b"engine")
    (folder / "1" / ".model.onnx.trtcache.tmp").write_bytes(b"partial")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "backend.cpython-311.pyc").write_bytes(b"pyc")
    assert fingerprint(folder) == before
    (folder / "1" / "model.onnx").write_bytes(b"new weights")
    assert fingerprint(folder) != before


HELD = TAGGED.replace('''    def forward(self, items):
        for item in items:''', '''    def forward(self, items):
        import os, time
        hold = self.config["hold"]
        if hold:
            open(hold + ".entered-" + self.config["tag"], "w").close()
            give_up = time.monotonic() + 20
            while os.path.exists(hold) and time.monotonic() < give_up:
                time.sleep(0.002)
        for item in items:''').replace('''"fail_warmup": trtserve.Key(bool, False)}''', '''"fail_warmup": trtserve.Key(bool, False),
                   "hold": trtserve.Key(str, "")}''')


def wait_exists(path: Path, timeout: float = 10.0) -> None:
    give_up = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < give_up, f"{path} never appeared"
        time.sleep(0.005)


def test_a_request_running_on_the_old_version_finishes_there_after_a_reload(tmp_path, repo):
    hold = tmp_path / "hold"
    hold.touch()
    folder = make_model(tmp_path, "m", f'backend = "Tagged"\ntag = "old"\nhold = "{hold}"\n', backend=HELD)
    repo.load("m")
    done, out = threading.Event(), {}
    repo.get("m").submit({"data": "A"}, lambda item, err: (out.update(item=item, err=err), done.set()))
    wait_exists(Path(f"{hold}.entered-old"))
    (folder / "config.toml").write_text('backend = "Tagged"\ntag = "new"\n')
    repo.load("m")  # swaps while A still runs on the old version
    assert infer(repo.get("m"), "B") == (1, "new", "B")
    assert not done.is_set()
    hold.unlink()
    assert done.wait(10)
    assert out["err"] is None and out["item"]["result"] == (1, "old", "A")


def test_the_old_version_serves_until_the_new_one_has_warmed_up(tmp_path, repo):
    hold = tmp_path / "hold"
    warm = '\n[[warmup]]\ncount = 1\n[warmup.inputs.x]\ndtype = "float32"\nshape = [1, 4]\n'
    folder = make_model(tmp_path, "m", 'backend = "Tagged"\ntag = "old"\n' + warm, backend=HELD)
    repo.load("m")
    hold.touch()
    (folder / "config.toml").write_text(f'backend = "Tagged"\ntag = "new"\nhold = "{hold}"\n' + warm)
    loader = threading.Thread(target=repo.load, args=("m",))
    loader.start()
    try:
        wait_exists(Path(f"{hold}.entered-new"))  # the new version's warmup is running
        assert infer(repo.get("m"), "during") == (1, "old", "during")
        assert repo.index()[0]["state"] == "READY"
    finally:
        hold.unlink()
        loader.join(20)
    assert infer(repo.get("m"), "after") == (1, "new", "after")


@pytest.mark.parametrize("folder_name", ["v1", "V2", "version_3", "ver-4"])
def test_a_version_folder_named_like_v1_is_not_a_version_and_says_so(tmp_path, repo, folder_name):
    folder = make_model(tmp_path, "m", 'backend = "Tagged"\n', versions=())
    (folder / folder_name).mkdir()
    with pytest.raises(ConfigError) as caught:
        repo.load("m")
    number = "".join(ch for ch in folder_name if ch.isdigit())
    assert f"folder {folder_name!r} is not a version" in caught.value.message
    assert f"rename it to {folder / number}" in caught.value.message
    assert repo.index()[0]["state"] == "UNAVAILABLE"


def test_a_model_without_version_folders_is_served_from_its_folder_as_version_1(tmp_path, repo):
    folder = make_model(tmp_path, "m", 'backend = "Tagged"\nmodel = "weights.bin"\n', versions=())
    with pytest.raises(ConfigError) as caught:
        repo.load("m")
    assert "no numbered version folder, so the model folder itself is served as version 1" in caught.value.message
    (folder / "weights.bin").write_bytes(b"w")
    model = repo.load("m")
    assert model.version == 1 and model.config.entry.options["model"] == str((folder / "weights.bin").resolve())


FIRST_SIGHT = """
import time
import trtserve

class FirstSight(trtserve.Backend):
    '''Slow the first time an instance sees a batch size, as a CUDA graph capture or a
    per-shape compilation is; records each (instance, size) it saw and when.'''

    def init(self, context):
        super().init(context)
        self.index = context.instance_index
        self.seen = []

    def forward(self, items):
        if len(items) not in self.seen:
            self.seen.append(len(items))
            time.sleep(0.05)
        for item in items:
            item["result"] = item["data"]

trtserve.register("FirstSight", FirstSight)
"""


def test_warmup_runs_every_instance_at_every_batch_size_before_ready(tmp_path, repo):
    """The cause of the multi-second p99 stalls through the server on the GPU: one-time work
    per batch size and instance (CUDA graph capture, cuDNN's algorithm choice) ran on the
    first live requests of each size, because warm-up sent its sample through the pipeline
    once, to one instance, at one size.  Now no batch served after READY meets a size its
    instance has not run before."""
    warm = '[[warmup]]\n[warmup.inputs.x]\ndtype = "float32"\nshape = [1, 4]\n'
    make_model(tmp_path, "m", 'backend = "FirstSight"\ninstance_num = 2\nmax = 4\nbatching_timeout = 5\n' + warm,
               backend=FIRST_SIGHT)
    repo.load_all()
    node = repo.get("m").pipeline.nodes[0]
    assert node.on_each_instance(lambda inst: sorted(inst.backend.seen)) == [[1, 2, 3, 4], [1, 2, 3, 4]]
    import numpy as np

    for _ in range(5):  # bursts: batches of every size on both instances
        done = [threading.Event() for _ in range(24)]
        for event in done:
            repo.get("m").submit({"data": np.zeros((1, 4), np.float32)}, lambda item, err, e=event: e.set())
        assert all(event.wait(10) for event in done)
    assert node.on_each_instance(lambda inst: sorted(inst.backend.seen)) == [[1, 2, 3, 4], [1, 2, 3, 4]]


def test_warmup_batch_sizes_limit_what_is_warmed(tmp_path, repo):
    warm = '[[warmup]]\nbatch_sizes = [2, 4, 9]\n[warmup.inputs.x]\ndtype = "float32"\nshape = [1, 4]\n'
    make_model(tmp_path, "m", 'backend = "FirstSight"\nmax = 4\n' + warm, backend=FIRST_SIGHT)
    repo.load_all()
    assert repo.get("m").pipeline.nodes[0].on_each_instance(lambda inst: inst.backend.seen) == [[2, 4]]


def test_a_warmup_sample_too_large_for_every_batch_is_a_load_failure(tmp_path, repo):
    warm = '[[warmup]]\nbatch_sizes = [1]\n[warmup.inputs.x]\ndtype = "float32"\nshape = [3, 4]\n'
    make_model(tmp_path, "m", 'backend = "FirstSight"\nmax = 4\n' + warm, backend=FIRST_SIGHT)
    repo.load_all()
    row = {r["name"]: r for r in repo.index()}["m"]
    assert row["state"] == "UNAVAILABLE" and "forms no batch" in row["reason"]


def test_a_model_folder_that_is_not_loaded_is_unavailable_with_the_fix(tmp_path, repo):
    make_model(tmp_path, "later", 'backend = "Tagged"\n')
    with pytest.raises(ModelUnavailableError) as excinfo:
        repo.get("later")  # on disk, never loaded (explicit model control)
    assert excinfo.value.details["state"] == "UNLOADED" and "--model-control" in excinfo.value.message
    for name in ("nope", "../later", "later/..", "x" * 300, ""):
        with pytest.raises(ModelNotFoundError):
            repo.get(name)
