"""The worker's side of the health probes: a heartbeat and three readiness checks, as gauges.

Runs as a task on the worker's event loop, so a heartbeat that stops means the loop is
stuck (``/healthz`` fails, see consumer/probes.py). Every ``BEAT_S`` it also asks PostgreSQL
(``SELECT 1`` on the worker's pool) and Kafka (a metadata request on the worker's consumer)
whether they answer, each bounded by ``CHECK_TIMEOUT_S``. It only reports: it never stops,
pauses or restarts anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from consumer import metrics

BEAT_S = 1.0
CHECK_TIMEOUT_S = 2.0
# Kafka and PostgreSQL are asked every this many beats (a metadata round trip each time).
CHECK_EVERY = 5


async def _answers(call: Any) -> bool:
    try:
        await asyncio.wait_for(call, CHECK_TIMEOUT_S)
    except Exception:
        return False
    return True


async def watch(worker: Any) -> None:
    """Beat until cancelled; the checks fail once the worker is stopping (it drains)."""
    checks = {"started": False, "postgres": False, "kafka": False}
    try:
        for n in range(1 << 62):
            started = worker.started.is_set() and not worker.stop.is_set()
            if not started:
                checks = dict.fromkeys(checks, False)
            elif n % CHECK_EVERY == 0 or not checks["started"]:
                checks["started"] = True
                checks["postgres"] = await _answers(worker.pool.fetchval("SELECT 1"))
                checks["kafka"] = await _answers(worker.consumer.topics())
            metrics.record_health(time.time(), checks)
            await asyncio.sleep(BEAT_S)
    finally:
        with contextlib.suppress(Exception):
            metrics.record_health(time.time(), dict.fromkeys(checks, False))
