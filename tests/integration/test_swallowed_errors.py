"""A transient database error swallowed by a handler must not burn the key.

The handler catches a deadlock (SQLSTATE 40P01, transient by the error tree) and carries on.
The savepoint is then aborted: either RELEASE fails (handler returned) or the handler's next
statement fails with 25P02 (in failed transaction). The runtime must classify the deadlock
behind that 25P02 (consumer/runtime/invoke.py, ``_cause``): classified as the 25P02, with
``on_error="reject"`` the key would be recorded as rejected, a transient failure recorded as
a final outcome. Contention must not even use up an attempt.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgpack
import pytest

from consumer import App, Context
from consumer.db.pool import create_pool
from consumer.dedup.leases import NoLeases
from consumer.message import Message
from consumer.runtime.batch import BatchProcessor, pg_transaction
from consumer.runtime.outcomes import Outcome
from tests.conftest import app_settings
from tests.integration.dedup_support import Pay, cleanup, inbox

pytestmark = pytest.mark.integration

DEADLOCK = "DO $$ BEGIN RAISE EXCEPTION 'simulated' USING ERRCODE = '40P01'; END $$"


@pytest.fixture
async def env(settings, pg, unique) -> AsyncIterator[dict[str, Any]]:
    s = app_settings(
        settings, relay_enabled=False, retry_backoff_ms=1, retry_backoff_max_ms=2, max_attempts=3
    )
    pool = await create_pool(settings.postgres_dsn, max_size=2)
    try:
        yield {"settings": s, "group": f"g-{unique}", "topic": f"swal-{unique}", "pool": pool}
    finally:
        await pool.close()
        await cleanup(pg, unique)


@pytest.mark.parametrize("then", ["return", "next_statement"])
async def test_swallowed_deadlock_does_not_burn_the_key(env, pg, then):
    app = App(env["group"], settings=env["settings"])
    calls: list[int] = []

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id, on_error="reject")
    async def handle(p: Pay, ctx: Context) -> Any:
        calls.append(ctx.attempt)
        if len(calls) == 1:  # only the first call meets the (transient) deadlock
            try:
                await ctx.db.execute(DEADLOCK)
            except asyncpg.DeadlockDetectedError:
                pass  # e.g. an optional best-effort update
            if then == "next_statement":
                await ctx.db.execute("SELECT 1")
        return {"ok": 1}

    processor = BatchProcessor(
        app, env["settings"], NoLeases(), "tok", lambda: pg_transaction(env["pool"])
    )
    msg = Message(env["topic"], 0, 0, None, msgpack.packb({"id": "k"}))
    outcomes = []
    for _ in range(5):
        result = await processor.process([msg])
        outcomes += [h.outcome for h in result.handled]
        if result.retry_offset is None:
            break
    row = (await inbox(pg, f"{env['group']}.handle")).get("k")
    assert outcomes == [Outcome.APPLIED], (outcomes, row and row["reason"])
    assert row is not None and row["status"] == "done"
