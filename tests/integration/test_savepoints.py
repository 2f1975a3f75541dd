"""A message's savepoint release may be deferred to the next savepoint (one round trip less per
message, consumer/db/tx.py), but only when none of the handler's statements failed. A handler
that catches a database error and returns anyway leaves the transaction failed: that must stay
this message's failure (retried, then dead-lettered as failed) and must not fail its whole
batch forever.
"""

from __future__ import annotations

import asyncpg
import msgpack
import pytest

from consumer import App, Context
from schemas.payments import PaymentRequested
from tests.conftest import app_settings, eventually, running
from tests.integration.dedup_support import outbox

pytestmark = pytest.mark.integration


async def test_swallowed_db_error_is_the_messages_failure(settings, topics, producer, pg, unique):
    topic = await topics("savepoints", partitions=1)
    table = f"sp_{unique}"
    await pg.execute(f"CREATE TABLE {table} (k text PRIMARY KEY)")
    await pg.execute(f"INSERT INTO {table} VALUES ('taken')")
    app = App(f"g-{unique}", settings=app_settings(settings, max_attempts=2, retry_backoff_ms=10))

    @app.handler(topic, schema=PaymentRequested, key=lambda p: p.payment_id)
    async def handle(p: PaymentRequested, ctx: Context) -> None:
        if p.account == "swallow":
            try:  # the anti-pattern: the error is caught, the transaction stays failed
                await ctx.db.execute(f"INSERT INTO {table} VALUES ('taken')")
            except asyncpg.UniqueViolationError:
                pass
        elif p.account == "nested":
            async with ctx.db.transaction():  # the right way: a nested savepoint
                await ctx.db.execute(f"INSERT INTO {table} VALUES ($1)", p.payment_id)
        else:
            await ctx.db.execute(f"INSERT INTO {table} VALUES ($1)", p.payment_id)

    for pid, account in [("p1", "a"), ("p2", "swallow"), ("p3", "a"), ("p4", "nested")]:
        value = msgpack.packb({"payment_id": pid, "account": account, "cents": 1})
        await producer.send_and_wait(topic, value, partition=0)

    async with running(app) as worker:

        async def all_seen() -> bool:
            return worker.stats.by_outcome["applied"] + worker.stats.by_outcome["failed"] >= 4

        await eventually(all_seen)
    rows = await pg.fetch(f"SELECT k FROM {table} ORDER BY k")
    assert [r["k"] for r in rows] == ["p1", "p3", "p4", "taken"]
    inbox = {
        r["key"]: (r["status"], r["reason"] or "")
        for r in await pg.fetch(
            "SELECT key, status, reason FROM dedup.inbox WHERE namespace = $1", handle.name
        )
    }
    # p2 failed on every attempt: dead-lettered with the reason, nothing recorded.
    assert {k: s for k, (s, _) in inbox.items()} == {"p1": "done", "p3": "done", "p4": "done"}
    [dead] = await outbox(pg, topic + ".dlq")
    assert dead["headers"]["x-reason"] == "failed"
    # The swallowed error, not the "transaction is aborted" it left behind.
    assert "UniqueViolationError" in dead["headers"]["x-detail"]
    assert worker.stats.by_outcome["applied"] == 3
    await pg.execute(f"DROP TABLE {table}")
