"""deploy/k8s/consumer.yaml stays true to the code: its probes are the health server's
paths, its grace period outlasts the drain, and every CONSUMER_* it sets is a setting."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer import metrics
from consumer.settings import PREFIX, Settings

pytestmark = pytest.mark.unit

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "consumer.yaml"


def _workload() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    (workload,) = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    return workload


def _container() -> dict[str, Any]:
    (container,) = _workload()["spec"]["template"]["spec"]["containers"]
    return container


def _env() -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in _container()["env"]}


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_probes_are_paths_the_health_server_answers():
    c = _container()
    probes = {name: c[name]["httpGet"] for name in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in probes.values():
        assert ports[probe["port"]] == int(_env()["CONSUMER_METRICS_PORT"])
    server = metrics.Server(0, addr="127.0.0.1")
    try:
        assert _status(server.port, "/nowhere") == 404  # what a wrong path would get
        for probe in [*probes.values(), c["startupProbe"]["httpGet"]]:
            assert _status(server.port, probe["path"]) in (200, 503)  # answered, not 404
    finally:
        server.close()


def test_the_grace_period_outlasts_the_shutdown_grace():
    grace_s = _workload()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    default_s = Settings.model_fields["shutdown_grace_s"].default
    configured_s = float(_env().get("CONSUMER_SHUTDOWN_GRACE_S") or default_s)
    assert grace_s > default_s and grace_s >= configured_s + 5  # docs/operations.md, 3


def test_every_consumer_variable_is_a_setting():
    names = [n for n in _env() if n.startswith(PREFIX)]
    assert "CONSUMER_POSTGRES_DSN" in names and "CONSUMER_STATIC_MEMBERSHIP" in names
    unknown = [n for n in names if n.removeprefix(PREFIX).lower() not in Settings.model_fields]
    assert unknown == []
    # And each literal value is one Settings accepts (no connection to anything is made).
    literal = {n.removeprefix(PREFIX).lower(): v for n, v in _env().items() if n in names and v}
    Settings.model_validate(literal)


def test_it_runs_the_supervisor_with_workers_and_resources():
    c = _container()
    assert c["command"][:2] == ["consumer", "run"] and "--workers" in c["command"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
