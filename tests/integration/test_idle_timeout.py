"""The worker's idle-in-transaction timeout covers every handler's own ``timeout_s``, and an
operator's longer role setting is kept (issue 13 #13).

A handler awaiting an outside call inside the batch transaction is "idle in transaction" to
PostgreSQL. The pool's value was sized for ``CONSUMER_HANDLER_TIMEOUT_S`` only and overrode
the role's: a handler allowed longer lost its session on every run, forever, and its outside
call was repeated each time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import msgpack
import pytest

from consumer import App, Context
from consumer.db.pool import create_pool
from tests.conftest import app_settings, eventually, running
from tests.integration.dedup_support import Pay, cleanup

pytestmark = pytest.mark.integration


async def test_a_handler_longer_than_the_default_timeout_keeps_its_session(
    settings, topics, producer, pg, unique
):
    topic = await topics("idle", partitions=1)
    table = f"idle_{unique}"
    await pg.execute(f"CREATE TABLE {table} (k text)")
    # Default handler timeout 0.5 s + lease 0.5 s: the pool's sessions were ended after 1 s
    # idle in a transaction; this handler may take 5 s and its outside call takes 2 s.
    s = app_settings(
        settings, handler_timeout_s=0.5, lease_ms=500, relay_enabled=False, max_attempts=50
    )
    app = App(f"g-{unique}", settings=s)
    outside_calls: list[str] = []

    @app.handler(topic, schema=Pay, key=lambda p: p.id, timeout_s=5)
    async def handle(p: Pay, ctx: Context) -> Any:
        await ctx.db.execute(f"INSERT INTO {table} VALUES ($1)", p.id)
        outside_calls.append(p.id)
        await asyncio.sleep(2.0)  # the outside call, inside the batch transaction
        return {"ok": 1}

    try:
        await producer.send_and_wait(topic, msgpack.packb({"id": "k"}), partition=0)
        async with running(app, s):

            async def done() -> bool:
                status = await pg.fetchval(
                    "SELECT status FROM dedup.inbox WHERE namespace = $1 AND key = 'k'",
                    handle.name,
                )
                return status == "done"

            await eventually(done, timeout_s=30)
        assert outside_calls == ["k"]  # once: the session was never ended under it
        assert await pg.fetchval(f"SELECT count(*) FROM {table}") == 1
    finally:
        await pg.execute(f"DROP TABLE {table}")
        await cleanup(pg, unique)


async def test_an_operators_longer_role_setting_is_kept(settings, pg, unique):
    role = f"idle_{unique}"
    await pg.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")
    await pg.execute(f"ALTER ROLE {role} SET idle_in_transaction_session_timeout = '90s'")
    dsn = settings.postgres_dsn.replace("postgres@", f"{role}@", 1)
    assert dsn != settings.postgres_dsn
    try:
        for asked, expected in ((5_000, "90s"), (120_000, "2min")):
            pool = await create_pool(dsn, max_size=1, idle_in_tx_ms=asked)
            try:
                value = await pool.fetchval("SHOW idle_in_transaction_session_timeout")
            finally:
                await pool.close()
            assert value == expected, (asked, value)
    finally:
        conn = await asyncpg.connect(settings.postgres_dsn)
        try:
            await conn.execute(f"DROP ROLE {role}")
        finally:
            await conn.close()
