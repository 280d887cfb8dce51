"""Config validation: every error names the file, the key, the offending value and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest

import trtserve
from trtserve.config import load_config
from trtserve.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def error_for(source, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(source, **kw)
    return info.value


def test_single_node_defaults_and_types(tmp_path):
    config = load_config(write(tmp_path, 'backend = "Identity"\nmax = 4\nbatching_timeout = 1.5\n'))
    node = config.entry
    assert [node.options[k] for k in ("max", "min", "instance_num", "batching_timeout")] == [4, 1, 1, 1.5]
    assert config.name == tmp_path.name and len(config.nodes) == 1


def test_multi_node_chain_is_ordered_from_the_entry(tmp_path):
    config = load_config(
        write(
            tmp_path,
            '[model]\nbackend = "Identity"\nmax = 8\n\n[pre]\nbackend = "S[Identity,Identity]"\n'
            'instance_num = 4\nnext = "model"\n',
        )
    )
    assert [n.name for n in config.nodes] == ["pre", "model"]
    assert config.nodes[0].scheduling.instance_num == 4


def test_declared_tensors(tmp_path):
    config = load_config(
        write(
            tmp_path,
            'backend = "Identity"\n[[input]]\nname = "x"\ndtype = "float32"\nshape = [-1, 4]\n'
            '[[output]]\nname = "y"\ndtype = "bytes"\n',
        )
    )
    assert config.inputs[0].to_dict() == {"name": "x", "dtype": "float32", "shape": [-1, 4]}
    assert config.outputs[0].shape == (-1,)


@pytest.mark.parametrize(
    "text, key, fragments",
    [
        ('backend = "Identity"\ninstance_nm = 2\n', "instance_nm", ["did you mean 'instance_num'?"]),
        ('backend = "Identity"\nmax = "8"\n', "max", ["must be an integer, got str '8'"]),
        ('backend = "Identity"\nmax = true\n', "max", ["must be an integer, got bool True"]),
        ('backend = "Identity"\nmax = 0\n', "max", ["max = 0 must be at least 1"]),
        ('backend = "Identity"\ninstance_num = -1\n', "instance_num", ["must be at least 1"]),
        ('backend = "Identity"\nbatching_timeout = -2\n', "batching_timeout", ["must be a finite number >= 0"]),
        ('backend = "Identity"\nbatching_timeout = nan\n', "batching_timeout", ["finite"]),
        ('backend = "Identity"\nmax = 2\nmin = 4\n', "min", ["min = 4 is larger than max = 2"]),
        ('backend = 3\n', "backend", ["must be a string"]),
        ('backend = "Identity"\nmodel = "missing.onnx"\n', "model", ["missing.onnx", "does not exist"]),
        ('max = 3\n', "max", ["unknown top-level key 'max'"]),
        ('[a]\nmax = 3\n', "[a].backend", ["node 'a' has no 'backend' key"]),
        ('[a]\nbackend = "Identity"\nnext = "bb"\n[b]\nbackend = "Identity"\n', "a.next", ["names no node", "did you mean 'b'"]),
        ('[a]\nbackend = "Identity"\n[b]\nbackend = "Identity"\n', "next", ["exactly one entry node", "['a', 'b']"]),
        ('[a]\nbackend = "Identity"\nnext = "b"\n[b]\nbackend = "Identity"\nnext = "a"\n', "next", ["none (a cycle)"]),
        ('[[input]]\nname = "x"\ndtype = "float32"\n', "backend", ["no 'backend' key and no node tables"]),
        ('backend = "Identity"\n[[input]]\nname = "x"\ndtype = "float"\n', "input[0].dtype", ["did you mean 'float", "float32"]),
        ('backend = "Identity"\n[[input]]\nname = "x"\ndtype = "uint8"\nshape = [2, "a"]\n', "input[0].shape", ["list of integers"]),
        ('backend = "Identity"\n[[input]]\nnme = "x"\n', "input[0].nme", ["did you mean 'name'"]),
        ('backend = "Identity"\n[[input]]\ndtype = "uint8"\n', "input[0].name", ["non-empty string"]),
        ('backend = "Identity"\ninput = 3\n', "input", ["array of tables"]),
    ],
)
def test_errors_name_file_key_and_fix(tmp_path, text, key, fragments):
    path = write(tmp_path, text)
    error = error_for(path)
    assert error.details["key"] == key
    assert error.details["file"] == str(path)
    assert error.message.startswith(str(path))
    for fragment in fragments:
        assert fragment in error.message


def test_unknown_key_lists_the_backends_keys(tmp_path):
    error = error_for(write(tmp_path, 'backend = "Identity"\nresize_h = 3\n'))
    assert "unknown key resize_h" in error.message and "valid keys are" in error.message


def test_node_table_errors_are_prefixed_with_the_table(tmp_path):
    error = error_for(write(tmp_path, '[pre]\nbackend = "Identity"\nmax = "x"\n'))
    assert error.details["key"] == "[pre].max"


def test_bad_backend_expression(tmp_path):
    error = error_for(write(tmp_path, 'backend = "S[Identity,"\n'))
    assert error.details["position"] == 11 and "expected a backend name" in error.message
    assert error.details["key"] == "backend" and error.message.startswith(str(tmp_path / "config.toml"))
    error = error_for(write(tmp_path, 'backend = "S[Identty]"\n'))
    assert "did you mean 'Identity'" in error.message and str(tmp_path / "config.toml") in error.message


def test_toml_syntax_error_and_missing_file(tmp_path):
    error = error_for(write(tmp_path, 'backend = "Identity\n'))
    assert "not valid TOML" in error.message and "line 1" in error.message
    error = error_for(tmp_path / "nope.toml")
    assert "config file not found" in error.message


def test_config_must_be_dict_or_path():
    error = error_for(42)
    assert "must be a dict or a path" in error.message


def test_model_path_resolves_against_the_model_dir(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "m.bin").write_bytes(b"x")
    config = load_config({"backend": "Identity", "model": "m.bin"}, model_dir=tmp_path / "1")
    assert config.entry.options["model"] == str((tmp_path / "1" / "m.bin").resolve())


def test_backend_keys_are_validated_with_their_types(tmp_path):
    class Scaled(trtserve.Backend):
        config_keys = {"scale": trtserve.Key(float, 1.0, "multiplier"), "mode": trtserve.Key(str, "a", choices=("a", "b"))}

        def forward(self, items):
            for item in items:
                item["result"] = item["data"] * self.config["scale"]

    trtserve.register("Scaled", Scaled)
    assert load_config({"backend": "Scaled"}).entry.options["scale"] == 1.0
    error = error_for({"backend": "Scaled", "scale": "2"})
    assert "scale must be a number, got str '2'" in error.message
    error = error_for({"backend": "Scaled", "mode": "c"})
    assert "mode = 'c' is not one of ['a', 'b']" in error.message
    with trtserve.pipe({"backend": "Scaled", "scale": 2.0}) as models:
        item = {"data": 3}
        models(item)
        assert item["result"] == 6.0


def test_register_rejects_non_backends_and_bad_names():
    with pytest.raises(ConfigError, match="must subclass trtserve.Backend"):
        trtserve.register("NotABackend", object)
    with pytest.raises(ConfigError, match="must be a Python identifier"):
        trtserve.register("bad name", trtserve.Backend)


# --------------------------------------------------------------------------- habits that miss


@pytest.mark.parametrize(
    "text, key, fragments",
    [
        ('backend = "Identity"\nmax_batch_size = 8\n', "max_batch_size",
         ["Triton's max_batch_size is called max (the largest batch, in rows) here; write max = 8"]),
        ('backend = "Identity"\ninstance_count = 2\n', "instance_count", ["write instance_num = 2"]),
        ('[pre]\nbackend = "Identity"\nnext = "model"\n[model]\nbackend = "Identity"\n', None, []),
    ],
)
def test_triton_spellings_say_what_they_are_called_here(tmp_path, text, key, fragments):
    if key is None:
        load_config(write(tmp_path, text))  # (a valid two-node config, for contrast)
        return
    error = error_for(write(tmp_path, text))
    assert error.details["key"] == key
    for fragment in fragments:
        assert fragment in error.message, error.message


@pytest.mark.parametrize("key, line", [("instance_num", "instance_num = 2"), ("max", "max = 8"), ("max_batch_size", "max = 8")])
def test_a_node_key_at_the_top_of_a_multi_node_config_belongs_in_a_node(tmp_path, key, line):
    value = line.split(" = ")[1]
    text = f'{key} = {value}\n[pre]\nbackend = "Identity"\nnext = "model"\n[model]\nbackend = "Identity"\n'
    error = error_for(write(tmp_path, text))
    assert error.details["key"] == key and error.message.startswith(str(tmp_path / "config.toml"))
    assert "this config has node tables ([pre], [model])" in error.message
    assert f"move the line {line} below the [header] of the node it is for" in error.message
    assert "did you mean" not in error.message


def test_a_backend_key_at_the_top_of_a_multi_node_config_belongs_in_a_node(tmp_path):
    text = 'resize_h = 64\n[pre]\nbackend = "ResizeMat"\nresize_w = 64\nnext = "model"\n[model]\nbackend = "Identity"\n'
    error = error_for(write(tmp_path, text))
    assert error.details["key"] == "resize_h" and "move the line resize_h = 64 below" in error.message


@pytest.mark.parametrize(
    "text, key, example",
    [
        ('backend = "OnnxRuntime"\n', "model", 'add model = "model.onnx" to the config'),
        ('[model]\nbackend = "OnnxRuntime"\n', "[model].model", 'add model = "model.onnx" to the node [model]'),
        ('backend = "S[DecodeMat,ResizeMat]"\nresize_w = 64\n', "resize_h", "add resize_h = 224"),
        ('backend = "CvtColorMat"\n', "color", 'add color = "rgb"'),
    ],
)
def test_a_missing_required_key_names_the_file_the_key_and_an_example(tmp_path, text, key, example):
    path = write(tmp_path, text)
    error = error_for(path)
    assert error.details["key"] == key and error.details["file"] == str(path)
    assert error.message.startswith(str(path)) and example in error.message


def test_an_undeclared_key_of_a_custom_backend_says_the_backend_must_declare_it(tmp_path):
    class Thresholded(trtserve.Backend):
        def forward(self, items):
            for item in items:
                item["result"] = item["data"] > self.config.get("threshold", 0)

    trtserve.register("Thresholded", Thresholded)
    error = error_for(write(tmp_path, 'backend = "Thresholded"\nthreshold = 0.5\n'))
    assert error.details["key"] == "threshold"
    assert "if Thresholded reads it, the backend must declare it: add config_keys = {'threshold': trtserve.Key(" in error.message
    # a plain typo keeps its suggestion and gets no such hint
    error = error_for(write(tmp_path, 'backend = "Thresholded"\ninstance_nmu = 2\n'))
    assert "did you mean 'instance_num'" in error.message and "must declare" not in error.message


def test_output_source_and_duplicate_names(tmp_path):
    config = load_config(write(tmp_path, 'backend = "Identity"\n[[output]]\nname = "boxes"\ndtype = "float32"\n'
                                          'source = "save_infer_model/scale_0.tmp_1"\n'))
    assert config.output_sources == {"boxes": "save_infer_model/scale_0.tmp_1"}
    error = error_for(write(tmp_path, 'backend = "Identity"\n[[input]]\nname = "x"\ndtype = "uint8"\nsource = "y"\n'))
    assert error.details["key"] == "input[0].source"
    error = error_for(write(tmp_path, 'backend = "Identity"\n[[output]]\nname = "y"\ndtype = "uint8"\nsource = ""\n'))
    assert error.details["key"] == "output[0].source"
    error = error_for(write(tmp_path, 'backend = "Identity"\n[[input]]\nname = "x"\ndtype = "uint8"\n'
                                      '[[input]]\nname = "x"\ndtype = "uint8"\n'))
    assert error.details["key"] == "input[1].name" and "declared twice" in error.message


def test_the_cli_reports_its_version_and_protocol():
    import subprocess
    import sys

    import trtserve
    from trtserve_client.wire import PROTOCOL_VERSION

    done = subprocess.run([sys.executable, "-m", "trtserve.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == f"trtserve {trtserve.__version__} (protocol version {PROTOCOL_VERSION})"
