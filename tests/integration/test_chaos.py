"""The chaos campaign, small: exactly once under real faults, and a checker that bites.

Runs ``python -m scripts.chaos`` on its own services instance (``.services/chaos-test``, ports
30092/27379/26432: never the shared one, which it kills and restarts), with 3,000 records, eight
kinds of scheduled faults plus random crashes at the fault points, then the broken build.
The campaign's last stdout line is its JSON summary; the assertions read that.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.chaos.checker import INVARIANTS

ROOT = Path(__file__).resolve().parents[2]
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
# Ports 30092/30093/27379/26432: below net.ipv4.ip_local_port_range (32768-60999 by default).
# Ports inside it (base 30000 gave 39092 and 35432) can be any outgoing connection's local
# port, or its TIME_WAIT's for 60 s, and the campaign's restarts then fail to bind them: the
# CI flake of issue 13 (Instance.ephemeral_ports). Overridable so that two checkouts can run
# this test at the same time on different ports.
DEFAULT_PORT_BASE = "21000"
PORT_BASE = os.environ.get("CHAOS_TEST_PORT_BASE") or DEFAULT_PORT_BASE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KINDS = (
    "worker_kill",
    "redis_restart",
    "postgres_restart",
    "broker_restart",
    "point_after_commit",
    "relay_kill_after_ack",
    # cheap ones of issue 13 (a few records each; the restore, failovers and topic
    # re-creation are left to `make chaos`, which is slower)
    "aborted_transactions",
    "unparseable_record",
)


def _missing() -> list[str]:
    missing = [tool for tool in ("java", "redis-server", "redis-cli") if not shutil.which(tool)]
    if not (PG_BIN / "postgres").exists():
        missing.append(f"{PG_BIN}/postgres")
    if not (ROOT / ".services" / "kafka" / "libs").is_dir() and not shutil.which("mvn"):
        missing.append("Kafka jars (run `make services` once)")
    return missing


@pytest.mark.timeout(900)
def test_exactly_once_under_faults_and_the_broken_build_is_caught(tmp_path: Path) -> None:
    if missing := _missing():
        msg = f"cannot start a private services instance: missing {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {msg}", pytrace=False)
        pytest.skip(msg)
    argv = [sys.executable, "-m", "scripts.chaos", "--records", "3000", "--workers", "2"]
    argv += ["--kinds", ",".join(KINDS), "--seed", "11", "--duration", "30"]
    argv += ["--broken-records", "1000", "--instance", "chaos-test", "--port-base", PORT_BASE]
    argv += ["--out", str(tmp_path)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=840)
    lines = proc.stdout.strip().splitlines()
    context = "\n".join(lines[-40:]) + "\n--- stderr ---\n" + proc.stderr[-3000:]
    assert lines, context
    summary = json.loads(lines[-1])

    # The workload is what the issue asks for.
    assert summary["records"] >= 3000
    assert summary["duplicates"] >= 500 and summary["conflicts"] >= 50, context
    assert summary["malformed"] > 0 and summary["rejects"] > 0, context
    # Faults happened (a scheduled one counts only if it took effect).
    assert summary["fault_kinds"] >= 5 and summary["faults_total"] >= 6, context
    # Exactly once, nothing lost, every offset accounted for, downstream too.
    for invariant in INVARIANTS:
        assert summary[invariant] == 0, f"{invariant}={summary[invariant]}\n{context}"
    assert summary["applied"] + summary["rejected"] == summary["unique_keys"], context
    assert summary["drained"] is True, context
    # The same checker reports the deliberately broken build.
    assert summary["checker_caught_broken_build"] == 1, context
    assert proc.returncode == 0, context
