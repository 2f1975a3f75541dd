"""PostgreSQL's own timeouts are transient, even with ``on_error="reject"`` (issue 13 #9):
a real ``statement_timeout`` (57014) and a real ``lock_timeout`` (55P03) on a handler's query
are retried, then dead-lettered as ``failed`` with nothing recorded, so the key is not burned
and a replay (or a later copy) runs the handler again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from consumer import App, Context
from consumer.db.pool import _init
from consumer.dedup.leases import NoLeases
from consumer.runtime.batch import BatchProcessor, pg_transaction
from consumer.runtime.outcomes import Outcome
from tests.integration.dedup_support import Pay, direct_env, drive, inbox, outbox, record

pytestmark = pytest.mark.integration


@pytest.fixture
async def env(settings, pg, unique) -> AsyncIterator[dict[str, Any]]:
    table = f"dbto_{unique}"
    await pg.execute(f"CREATE TABLE {table} (k text)")
    async with direct_env(settings, pg, unique, "dbto", max_attempts=3) as e:
        e["table"] = table
        yield e
    await pg.execute(f"DROP TABLE {table}")


async def _run(env: dict[str, Any], dsn: str, setting: str, query: str) -> list[Any]:
    """Drive one record through a handler running ``query``, on a pool whose sessions have
    ``setting`` = 150 ms (as an operator's role setting would)."""
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id, on_error="reject")
    async def handle(p: Pay, ctx: Context) -> Any:
        await ctx.db.execute(query)
        return {"ok": 1}

    pool = await asyncpg.create_pool(
        dsn, min_size=1, max_size=1, init=_init, server_settings={setting: "150"}
    )
    try:
        processor = BatchProcessor(
            app, env["settings"], NoLeases(), "tok", lambda: pg_transaction(pool)
        )
        results = await drive(processor, [record(env["topic"], 0, {"id": "k"})], 5)
    finally:
        await pool.close()
    return [h for r in results for h in r.handled]


async def _assert_not_burned(env: dict[str, Any], pg: asyncpg.Connection, handled: list[Any]):
    assert [h.outcome for h in handled] == [Outcome.FAILED], [
        (h.outcome, h.reason) for h in handled
    ]
    assert "attempts_exhausted (3)" in handled[0].reason
    assert await inbox(pg, f"{env['group']}.handle") == {}  # no record: the key is free
    dlq = await outbox(pg, env["topic"] + ".dlq")
    assert [d["headers"]["x-reason"] for d in dlq] == ["failed"]


async def test_statement_timeout_does_not_burn_the_key(env, pg, settings):
    handled = await _run(env, settings.postgres_dsn, "statement_timeout", "SELECT pg_sleep(5)")
    assert "QueryCanceledError" in handled[0].reason
    await _assert_not_burned(env, pg, handled)


async def test_lock_timeout_does_not_burn_the_key(env, pg, settings):
    holder = await asyncpg.connect(settings.postgres_dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute(f"LOCK TABLE {env['table']} IN ACCESS EXCLUSIVE MODE")
        handled = await _run(
            env, settings.postgres_dsn, "lock_timeout", f"INSERT INTO {env['table']} VALUES ('k')"
        )
        await tx.rollback()
    finally:
        await holder.close()
    assert "LockNotAvailableError" in handled[0].reason
    await _assert_not_burned(env, pg, handled)
    assert await pg.fetchval(f"SELECT count(*) FROM {env['table']}") == 0
