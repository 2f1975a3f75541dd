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
import pytest

from consumer import App, Context
from consumer.runtime.outcomes import Outcome
from tests.integration.dedup_support import Pay, direct_env, direct_processor, drive, inbox, record

pytestmark = pytest.mark.integration

DEADLOCK = "DO $$ BEGIN RAISE EXCEPTION 'simulated' USING ERRCODE = '40P01'; END $$"


@pytest.fixture
async def env(settings, pg, unique) -> AsyncIterator[dict[str, Any]]:
    async with direct_env(settings, pg, unique, "swal", max_attempts=3) as e:
        yield e


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

    results = await drive(direct_processor(app, env), [record(env["topic"], 0, {"id": "k"})], 5)
    outcomes = [h.outcome for r in results for h in r.handled]
    row = (await inbox(pg, f"{env['group']}.handle")).get("k")
    assert outcomes == [Outcome.APPLIED], (outcomes, row and row["reason"])
    assert row is not None and row["status"] == "done"


async def test_client_side_error_before_a_swallowed_deadlock_does_not_burn_the_key(env, pg):
    """The deadlock, not an earlier client-side error, is what aborted the savepoint.

    asyncpg refuses an argument it cannot encode (DataError) before anything reaches
    PostgreSQL, so the transaction is still fine; a deadlock swallowed after it does abort it.
    The RELEASE's 25P02 must be classified by the deadlock (transient, retried) and not by the
    client-side error (unknown, so ``on_error="reject"`` would burn the key).
    """
    app = App(env["group"], settings=env["settings"])
    calls: list[int] = []

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id, on_error="reject")
    async def handle(p: Pay, ctx: Context) -> Any:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            try:  # refused by the driver before sending: the transaction is still fine
                await ctx.db.execute("SELECT $1::int", "not a number")
            except asyncpg.DataError:  # raised by asyncpg itself, SQLSTATE 22000
                pass
            try:
                await ctx.db.execute(DEADLOCK)
            except asyncpg.DeadlockDetectedError:
                pass
        return {"ok": 1}

    results = await drive(direct_processor(app, env), [record(env["topic"], 0, {"id": "k"})], 5)
    outcomes = [h.outcome for r in results for h in r.handled]
    row = (await inbox(pg, f"{env['group']}.handle")).get("k")
    assert outcomes == [Outcome.APPLIED], (outcomes, row and row["reason"])
