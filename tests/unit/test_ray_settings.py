"""The [ray] config table and the --ray flags: validation, overrides, and no Ray import.

None of this needs Ray: the table is validated by every server, the flags by the parser.
"""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trtserve.cli import build_parser, main
from trtserve.config import load_config
from trtserve.errors import ConfigError
from trtserve.scaleout.cluster import check_address
from trtserve.scaleout.settings import (
    RaySettings,
    apply_overrides,
    parse_override,
    parse_ray_table,
)


@pytest.fixture
def cli_main():
    """trtserve.cli.main in this process; the event loop policy it installs (uvloop) is
    put back afterwards, so later tests run as they would without it."""
    policy = asyncio.get_event_loop_policy()
    yield main
    asyncio.set_event_loop_policy(policy)


def config_with(tmp_path: Path, table: str, multi_node: bool = False) -> Path:
    path = tmp_path / "config.toml"
    body = '[model]\nbackend = "Identity"\n' if multi_node else 'backend = "Identity"\n'
    path.write_text(body + "[ray]\n" + table)
    return path


def error_for(tmp_path: Path, table: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(config_with(tmp_path, table))
    return info.value


@pytest.mark.parametrize("multi_node", [False, True])
def test_the_table_is_read_in_both_config_forms(tmp_path, multi_node):
    config = load_config(config_with(tmp_path, "num_replicas = 3\nnum_gpus = 0.5\n", multi_node))
    assert config.ray == RaySettings(num_replicas=3, num_gpus=0.5)
    assert [n.name for n in config.nodes] == (["model"] if multi_node else [config.name])  # ray is no node
    assert config.ray.deployment_options() == {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0.5}, "num_replicas": 3}


def test_no_table_deploys_one_replica_with_one_cpu(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('backend = "Identity"\n')
    assert load_config(path).ray.deployment_options() == {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0},
                                                           "num_replicas": 1}


def test_autoscaling_options_are_serves(tmp_path):
    table = "min_replicas = 1\nmax_replicas = 4\ntarget_ongoing_requests = 3\nupscale_delay_s = 2\n" \
            "downscale_delay_s = 60\nlook_back_period_s = 5\n"
    options = load_config(config_with(tmp_path, table)).ray.deployment_options()
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3,
                                             "upscale_delay_s": 2, "downscale_delay_s": 60, "look_back_period_s": 5,
                                             "policy": {"policy_function": "trtserve.scaleout.autoscale.in_flight_policy"}}
    assert "num_replicas" not in options


def test_the_autoscaling_policy_reads_the_metric_replicas_report():
    """The policy is shipped to Serve's controller by value, so it names the metric by a
    literal; this is the check that the literal and the replicas' key agree."""
    from types import SimpleNamespace

    from trtserve.scaleout.autoscale import IN_FLIGHT_METRIC, in_flight_policy

    config = SimpleNamespace(get_target_ongoing_requests=lambda: 2)
    ctx = SimpleNamespace(current_num_replicas=2, target_num_replicas=2, running_replicas=["a", "b"], config=config,
                          aggregated_metrics={IN_FLIGHT_METRIC: {"a": 5.0, "b": 3.0, "gone": 40.0}})
    assert in_flight_policy(ctx) == (4.0, {})  # (5 + 3) / 2: a stopped replica's last report does not count
    ctx.aggregated_metrics = {}
    assert in_flight_policy(ctx) == (0.0, {})  # idle: Serve keeps min_replicas


@pytest.mark.parametrize("table, key, fragments", [
    ("num_replica = 2\n", "ray.num_replica", ["did you mean 'num_replicas'", "valid keys are"]),
    ("num_replicas = 0\n", "ray.num_replicas", ["must be an integer >= 1"]),
    ("num_replicas = 1.5\n", "ray.num_replicas", ["must be an integer >= 1"]),
    ("num_replicas = true\n", "ray.num_replicas", ["must be an integer >= 1"]),
    ("num_gpus = -1\n", "ray.num_gpus", ["must be a number >= 0"]),
    ("num_cpus = \"two\"\n", "ray.num_cpus", ["must be a number >= 0"]),
    ("num_cpus = inf\n", "ray.num_cpus", ["must be a number >= 0"]),
    ("max_requests_per_call = 8\n", "ray.max_requests_per_call", ["no longer used", "delete the key"]),
    ("max_ongoing_requests = 8\n", "ray.max_ongoing_requests", ["no longer used", "delete the key"]),
    ("num_replicas = 2\nmax_replicas = 3\n", "ray.num_replicas", ["fixed count", "keep one"]),
    ("target_ongoing_requests = 2\n", "ray.target_ongoing_requests", ["only when Ray Serve autoscales",
                                                                     "add min_replicas and max_replicas"]),
    ("min_replicas = 3\nmax_replicas = 2\n", "ray.min_replicas", ["larger than max_replicas", "make min <= max"]),
    ("min_replicas = 0\nmax_replicas = 2\n", "ray.min_replicas", ["must be an integer >= 1"]),
    ("min_replicas = 1\nmax_replicas = 2\ntarget_ongoing_requests = 0\n", "ray.target_ongoing_requests",
     ["must be a number > 0"]),
])
def test_bad_values_name_file_key_value_and_fix(tmp_path, table, key, fragments):
    error = error_for(tmp_path, table)
    assert error.details["key"] == key
    assert error.details["file"].endswith("config.toml") and error.message.startswith(error.details["file"])
    for fragment in fragments:
        assert fragment in error.message


def test_a_table_that_is_not_a_table(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('backend = "Identity"\nray = 2\n')
    with pytest.raises(ConfigError, match=r"\[ray\] must be a table"):
        load_config(path)


# --------------------------------------------------------------------------- overrides


def test_overrides_apply_to_every_model_or_one():
    overrides = [parse_override("num_cpus=0.5"), parse_override("resnet:num_gpus=1")]
    assert apply_overrides({"num_replicas": 2}, "mlp", overrides) == {"num_replicas": 2, "num_cpus": 0.5}
    assert apply_overrides(None, "resnet", overrides) == {"num_cpus": 0.5, "num_gpus": 1}
    table = {"num_replicas": 2}
    assert apply_overrides(table, "mlp", [parse_override("other:num_gpus=1")]) is table  # untouched


def test_overriding_the_replica_count_switches_between_fixed_and_autoscaling():
    autoscaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}
    fixed = apply_overrides(autoscaling, "m", [parse_override("num_replicas=3")])
    assert parse_ray_table(fixed, "x") == RaySettings(num_replicas=3)
    scaled = apply_overrides({"num_replicas": 2}, "m", [parse_override("max_replicas=5")])
    assert parse_ray_table(scaled, "x") == RaySettings(max_replicas=5)


def test_overridden_values_obey_the_tables_rules():
    table = apply_overrides({}, "m", [parse_override("num_gpus=-2")])
    with pytest.raises(ConfigError, match=r"ray.num_gpus = -2 must be a number >= 0"):
        parse_ray_table(table, "config.toml with --ray-set")


@pytest.mark.parametrize("text, fragment", [
    ("num_replicas", "expected [MODEL:]KEY=VALUE"),
    ("=2", "expected [MODEL:]KEY=VALUE"),
    (":num_replicas=2", "expected [MODEL:]KEY=VALUE"),
    ("num_replica=2", "did you mean 'num_replicas'"),
    ("num_gpus=one", "is not a number"),
    ("max_requests_per_call=32", "no longer used"),
])
def test_bad_override_flags(text, fragment):
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    assert fragment in info.value.message and text in info.value.message


# --------------------------------------------------------------------------- flags


def test_ray_flags_parse():
    args = build_parser().parse_args(["serve", "--repository", "r", "--ray", "auto", "--ray-set", "m:num_gpus=1",
                                      "--ray-app-prefix", "prod-"])
    assert args.ray == "auto" and args.ray_set[0].model == "m" and args.ray_app_prefix == "prod-"
    assert args.ray_deploy_timeout == 300.0
    assert build_parser().parse_args(["serve", "--repository", "r"]).ray is None


@pytest.mark.parametrize("address", ["local", "auto", "10.0.0.1:6379", "head.ray.svc:6379", "ray://head:10001"])
def test_accepted_ray_addresses(address):
    assert check_address(address) == address


@pytest.mark.parametrize("argv, fragment", [
    (["--ray", "somewhere"], "expected 'local'"),
    (["--ray", "auto", "--ray-set", "bogus=1"], "unknown key 'bogus'"),
    (["--ray", "auto", "--ray-deploy-timeout", "0"], "seconds > 0, got 0"),
    (["--ray", "auto", "--ray-deploy-timeout", "soon"], "expected a number of seconds, got 'soon'"),
])
def test_bad_ray_flags_exit_2_with_the_reason(capsys, argv, fragment):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--repository", "r", *argv])
    assert info.value.code == 2 and fragment in capsys.readouterr().err


def test_ray_set_without_ray_is_refused(capsys, tmp_path, cli_main):
    assert cli_main(["serve", "--repository", str(tmp_path), "--ray-set", "num_replicas=2"]) == 2
    assert "applies only with --ray" in capsys.readouterr().err


def test_trtserve_without_ray_never_imports_ray(tmp_path):
    """`import trtserve`, config loading, the CLI parser and a served model: no Ray module."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.toml").write_text('backend = "Identity"\n[ray]\nnum_replicas = 2\n')
    code = f"""
import sys, asyncio
import trtserve
from trtserve.cli import build_parser
from trtserve.repository import ModelRepository
from trtserve.server import Server
build_parser().parse_args(["serve", "--repository", "x"])
async def run():
    server = Server(ModelRepository({str(tmp_path)!r}), port=0)
    await server.start()
    await server.stop(0)
asyncio.run(run())
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
assert not loaded, loaded
print("no ray")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "no ray" in done.stdout, done.stderr


def test_ray_flag_without_ray_installed_says_how_to_install_it(tmp_path):
    code = f"""
import sys
sys.modules["ray"] = None  # as if the [ray] extra were not installed: importing it fails
from trtserve.cli import main
raise SystemExit(main(["serve", "--repository", {str(tmp_path)!r}, "--ray", "local"]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "pip install 'trtserve[ray]'" in done.stderr


def test_front_door_options_are_checked_before_anything_is_deployed(tmp_path):
    pytest.importorskip("ray", reason="RayRepository needs the [ray] extra")
    from trtserve.scaleout.repository import RayRepository, _check_prefix

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.toml").write_text('backend = "Identity"\n')
    with pytest.raises(ConfigError, match=r"--ray-set names model 'nope'.*models there: \['m'\]"):
        RayRepository(tmp_path, overrides=[parse_override("nope:num_cpus=1")])
    for bad in ("", "a b", "x/y"):
        with pytest.raises(ConfigError, match="--ray-app-prefix"):
            _check_prefix(bad)
    assert _check_prefix("prod-") == "prod-"


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_address_where_no_cluster_answers_fails_fast(tmp_path, form):
    pytest.importorskip("ray", reason="--ray needs the [ray] extra")
    import subprocess
    import sys

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = form.format(port=sock.getsockname()[1])
    started = time.monotonic()
    # A process of its own: in this one, another test's Ray session may already be connected.
    done = subprocess.run([sys.executable, "-m", "trtserve.cli", "serve", "--repository", str(tmp_path), "--ray", address],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert time.monotonic() - started < 30  # Ray itself would wait minutes
    assert "nothing answers there" in done.stderr
