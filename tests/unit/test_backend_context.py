"""Backend.init(context): what an instance is told, the typed options of the built-in
backends, and the refusal of a backend written for the old init(config, kwargs)."""
from __future__ import annotations

import dataclasses
import re
import threading
from pathlib import Path

import pytest

import trtserve
from trtserve.backend import BackendOptions, InstanceContext, Key, option
from trtserve.backends.gpu.sync import SyncTensor
from trtserve.backends.gpu.tensorrt import TensorrtOptions, TensorrtTensor
from trtserve.backends.gpu.torchscript import TorchScriptTensor
from trtserve.backends.onnxruntime import OnnxRuntime, OnnxRuntimeOptions
from trtserve.config import load_config
from trtserve.errors import ConfigError

_seen: list[InstanceContext] = []
_lock = threading.Lock()


class Told(trtserve.Backend):
    """Records the context of each instance and counts one model call per batch."""

    config_keys = {"scale": Key(int, 2, "multiplier")}

    def init(self, context):
        super().init(context)
        with _lock:
            _seen.append(context)
        self.scale = context.config["scale"]
        self.record_call = context.record_call

    def forward(self, items):
        self.record_call(len(items))
        for item in items:
            item["result"] = item["data"] * self.scale


class OldStyle(trtserve.Backend):
    def init(self, config, kwargs):
        super().init(config, kwargs)

    def forward(self, items):
        for item in items:
            item["result"] = item["data"]


def test_each_instance_is_told_its_index_node_model_config_and_what_the_program_passed():
    _seen.clear()
    trtserve.register("Told", Told)
    with trtserve.pipe({"backend": "Told", "instance_num": 2, "scale": 3}, tenant="blue") as models:
        item = {"data": 2}
        models(item)
        assert item["result"] == 6
        stats = models.pipeline.nodes[0].stats.snapshot()
    assert sorted(c.instance_index for c in _seen) == [0, 1]
    context = _seen[0]
    assert (context.node, context.model, context.where) == ("model", "model", "model.model")
    assert context.config["scale"] == 3 and context.config["instance_num"] == 2
    assert dict(context.extra) == {"tenant": "blue"}
    assert (context.version, context.model_dir) == (None, None)  # not from a repository
    assert stats["model_calls"] == 1  # context.record_call counts into the node's statistics


def test_outside_a_pipeline_calls_are_counted_nowhere():
    InstanceContext({}).record_call(8)  # no statistics: nothing to count into, and no error


def test_a_backend_written_for_init_config_kwargs_is_refused_at_load_with_the_fix():
    trtserve.register("OldStyle", OldStyle)
    with pytest.raises(ConfigError) as caught:
        trtserve.pipe({"backend": "S[Identity,OldStyle]"})
    message = caught.value.message
    assert "OldStyle.init(self, config, kwargs) does not take the instance context" in message
    assert "def init(self, context)" in message and "docs/writing-a-backend.md" in message
    assert caught.value.details["backend"] == "OldStyle"


def test_built_in_options_declare_the_config_keys_under_the_config_files_names():
    assert list(OnnxRuntime.config_keys) == ["intra_op_threads", "inter_op_threads", "providers", "pad"]
    assert list(TensorrtTensor.config_keys) == ["precision", "workspace_mb", "trt_module", "engine_cache", "input_shapes"]
    assert list(TorchScriptTensor.config_keys) == ["device", "add_batch_dim", "result_device", "cuda_graph"]
    assert list(SyncTensor.config_keys) == ["device_id", "overlap"]
    assert OnnxRuntime.config_keys["intra_op_threads"].default == 1


def test_options_are_typed_frozen_and_read_from_the_nodes_config():
    config = {"model": "m.onnx", "max": 8, "providers": ["CPUExecutionProvider"], "pad": {"x": {"value": 0.0}},
              "instance_num": 3}
    options = InstanceContext(config).options(OnnxRuntimeOptions)
    assert options == OnnxRuntimeOptions(model="m.onnx", providers=("CPUExecutionProvider",), pad=options.pad)
    assert options.intra_op_threads == 1  # a key the config lacks keeps its default
    assert dict(options.pad["x"]) == {"value": 0.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.model = "other.onnx"  # type: ignore[misc]
    with pytest.raises(TypeError):
        options.pad["y"] = {}  # type: ignore[index]


def test_tensorrt_options_name_the_build_keys_a_prebuilt_engine_cannot_take():
    assert TensorrtOptions().build_keys_set() == []
    assert TensorrtOptions(precision="fp16", input_shapes={"x": (3, 4)}).build_keys_set() == ["precision", "input_shapes"]


def test_a_user_backend_may_declare_typed_options_too():
    @dataclasses.dataclass(frozen=True)
    class GainOptions(BackendOptions):
        gain: float = option(Key(float, 1.5, "multiplier"))

    class Gain(trtserve.Backend):
        Options = GainOptions

        def init(self, context):
            super().init(context)
            self.gain = context.options(GainOptions).gain

        def forward(self, items):
            for item in items:
                item["result"] = item["data"] * self.gain

    assert list(Gain.config_keys) == ["gain"]
    trtserve.register("Gain", Gain)
    with trtserve.pipe({"backend": "Gain", "gain": 4.0}) as models:
        item = {"data": 2}
        models(item)
        assert item["result"] == 8.0
    with pytest.raises(ConfigError, match="gain must be a number"):
        trtserve.pipe({"backend": "Gain", "gain": "x"})


def test_keys_that_contradict_each_other_fail_the_load_naming_the_file_and_node(tmp_path):
    plan = tmp_path / "1" / "model.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"an engine")  # never read: the config is refused first, on any machine
    (tmp_path / "config.toml").write_text('[det]\nbackend = "TensorrtTensor"\nmodel = "model.plan"\nprecision = "fp16"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "config.toml", model_dir=tmp_path / "1")
    assert caught.value.message.startswith(f"{tmp_path / 'config.toml'}: precision = 'fp16' applies to ONNX models only")
    assert caught.value.details["key"] == "[det].precision"


def test_cuda_only_keys_on_a_cpu_node_fail_the_load():
    for key, value in (("cuda_graph", True), ("result_device", "device")):
        with pytest.raises(ConfigError, match=f'{key} = .* needs CUDA, and this node has device = "cpu"') as caught:
            load_config({"backend": "TorchScriptTensor", "model": __file__, "device": "cpu", key: value})
        assert caught.value.details["key"] == key


def test_the_guides_typed_options_example_runs():
    guide = (Path(__file__).resolve().parents[2] / "docs" / "writing-a-backend.md").read_text()
    [code] = [b for b in re.findall(r"```python\n(.*?)```", guide, re.S) if "class GainOptions" in b]
    scope: dict = {}
    exec(compile(code, "writing-a-backend.md", "exec"), scope)

    class GuideGain(scope["Gain"]):  # the guide's snippet shows init; a forward to run it
        def forward(self, items):
            for item in items:
                item["result"] = item["data"] * self.gain

    trtserve.register("GuideGain", GuideGain)
    with trtserve.pipe({"backend": "GuideGain", "gain": 2.0}) as models:
        item = {"data": 3}
        models(item)
    assert item["result"] == 6.0
