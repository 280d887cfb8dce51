"""deploy/: what can be checked without a cluster or a container engine.

The manifests parse; every command line in them and in the Dockerfiles is accepted by the
real CLI parser; probes name the health paths and the port the server serves them on;
Services, the PodDisruptionBudget and the HPA select what the Deployment runs; the
termination grace period covers the server's drain.  (The health endpoints themselves are
exercised over HTTP in tests/integration/test_health_endpoints.py.)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trtserve.cli import build_parser
from trtserve.server.shard import CLOSE_TIMEOUT_S
from trtserve.server.health import HEALTHZ, READYZ

yaml = pytest.importorskip("yaml", reason="the manifest checks need PyYAML (in the [test] extra)")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROOT = DEPLOY.parent
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
DOCKERFILES = sorted(DEPLOY.glob("Dockerfile.*"))


def documents() -> list[dict]:
    docs = []
    for path in MANIFESTS:
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in documents() if d.get("kind") == kind]


def parse_serve(argv: list[str]):
    """The real parser; a rejected command line fails the test with argparse's message."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"trtserve rejects {argv}: exit {exc.code}")
    assert args.command == "serve"
    return args


@pytest.fixture(scope="module")
def container() -> dict:
    (deployment,) = by_kind("Deployment")
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return main


@pytest.fixture(scope="module")
def args(container):
    assert container["command"] == ["trtserve"]
    return parse_serve([str(a) for a in container["args"]])


def test_every_manifest_parses_and_names_itself():
    assert {p.name for p in MANIFESTS} >= {"deployment.yaml", "service.yaml", "pdb.yaml", "hpa.yaml"}
    for doc in documents():
        if "kind" in doc and doc["kind"] != "Kustomization":  # kustomize's own file has no name
            assert doc["apiVersion"] and doc["metadata"]["name"], doc


def test_kustomization_lists_the_kubernetes_objects():
    (kustomization,) = by_kind("Kustomization")
    assert sorted(kustomization["resources"]) == ["deployment.yaml", "hpa.yaml", "pdb.yaml", "service.yaml"]


def test_probes_use_the_health_paths_on_the_metrics_port(container, args):
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["trtserve"] == args.port and ports["http-metrics"] == args.metrics_port
    assert args.host == "0.0.0.0"  # the kubelet probes the pod IP, not 127.0.0.1
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == READYZ
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == HEALTHZ
    for probe in probes.values():
        assert ports[probe["port"]] == args.metrics_port


def test_termination_grace_covers_prestop_and_the_drain(container, args):
    (deployment,) = by_kind("Deployment")
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert grace >= float(command[1]) + args.grace_period + CLOSE_TIMEOUT_S


def test_services_pdb_and_hpa_select_the_deployment(container):
    (deployment,) = by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in container["ports"]}
    for service in by_kind("Service"):
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_hpa_scales_on_a_gauge_the_server_exports():
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    source = (ROOT / "trtserve" / "server" / "collector.py").read_text()
    assert f'"{name}"' in source  # the live gauge; test_health_endpoints scrapes it for real
    rules = yaml.safe_load((DEPLOY / "kubernetes" / "prometheus-adapter-rules.yaml").read_text())
    assert rules["rules"][0]["name"]["as"] == name


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_command_parses_and_copies_what_exists(dockerfile, container):
    text = dockerfile.read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    command = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert entrypoint == ["trtserve"]
    args = parse_serve(command)
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()}
    assert {args.port, args.metrics_port} <= exposed
    assert {p["containerPort"] for p in container["ports"]} <= exposed
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
    extras = re.search(r'pip install "\.\[([a-z,]+)\]"', text).group(1).split(",")
    assert "ray" in extras  # the front door's --ray works in both images
