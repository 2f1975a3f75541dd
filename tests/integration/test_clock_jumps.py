"""Wall-clock jumps cannot decide a lease (issue 13, not confirmed; kept as a test).

Lease TTLs are kept by Redis (``SET NX PX``: expiry on the server's clock), renewals are timed
with the event loop's monotonic clock, and no module of the lease/batch path reads the wall
clock. A jump of the worker's wall clock (NTP step, VM restore) therefore changes nothing: the
lease is still held against another token, and its owner can still renew it.
"""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from consumer.dedup.leases import RedisLeases
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

# Modules whose timing decides leases, waits, retries and batches.
DECIDING = ["consumer/dedup", "consumer/runtime", "consumer/db"]


# The one place the wall clock is read on purpose: a retry record's due time is an instant
# that travels between processes (written by one worker, waited for by another), so it is
# wall-clock by definition; it decides no lease, and a jump moves a retry at most by the cap
# ``hold_back`` puts on every wait (docs/handlers.md, "Retries that do not block").
# Named by function, not by line.
ALLOWED = {
    ("consumer/runtime/retry_topics.py", "divert"),
    ("consumer/runtime/retry_topics.py", "hold_back"),
}


def test_no_lease_decision_reads_the_wall_clock():
    found = []
    for folder in DECIDING:
        for path in sorted(Path(ROOT, folder).glob("*.py")):
            tree = ast.parse(path.read_text())
            for fn in [tree, *ast.walk(tree)]:
                if isinstance(fn, ast.Module):
                    body = [
                        n
                        for n in fn.body
                        if not isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                    ]
                    name = "<module>"
                elif isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    body, name = fn.body, fn.name
                else:
                    continue
                for node in (n for b in body for n in ast.walk(b)):
                    if isinstance(node, ast.Attribute) and (
                        (node.attr == "time" and getattr(node.value, "id", "") == "time")
                        or node.attr in {"now", "utcnow", "today"}
                    ):
                        where = (str(path.relative_to(ROOT)), name)
                        if where not in ALLOWED:
                            found.append(f"{where[0]}:{node.lineno} ({name})")
    assert found == []


@pytest.mark.parametrize("jump_s", [86_400.0, -86_400.0])
async def test_a_wall_clock_jump_neither_frees_nor_loses_a_lease(
    settings, unique, monkeypatch, jump_s
):
    leases = RedisLeases(settings.redis_url, epoch=f"e{unique}")
    ident = (f"ns-{unique}", "k")
    try:
        [first] = await leases.acquire([ident], "owner", 30_000)
        assert first.state == "acquired"
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + jump_s)
        [other] = await leases.acquire([ident], "intruder", 30_000)
        assert other.state == "held"
        assert await leases.renew([ident], "owner", 30_000) == 1
        assert await leases.renew([ident], "intruder", 30_000) == 0
    finally:
        await leases.finish([], [ident], "owner", 60)
        await leases.close()
