"""End-to-end: one worker, each outcome once, against real Kafka, Redis and PostgreSQL."""

from __future__ import annotations

import msgpack
import pytest

from consumer import App, Context, Reject
from schemas.payments import PaymentRequested
from tests.conftest import app_settings, eventually, running

pytestmark = pytest.mark.integration


async def test_each_outcome_once(settings, topics, producer, pg, unique):
    topic = await topics("smoke")
    app = App(f"g-{unique}", settings=app_settings(settings))
    await pg.execute("CREATE TABLE IF NOT EXISTS test_effects (k text, cents int)")

    @app.handler(topic, schema=PaymentRequested, key=lambda p: p.payment_id)
    async def settle(p: PaymentRequested, ctx: Context) -> dict[str, str]:
        await ctx.db.execute(
            "INSERT INTO test_effects VALUES ($1, $2)", unique + p.payment_id, p.cents
        )
        if p.cents < 0:
            raise Reject("negative")
        return {"ok": p.payment_id}

    def m(pid: str, cents: int) -> bytes:
        return msgpack.packb({"payment_id": pid, "account": "a", "cents": cents})

    for value, part in [
        (m("p1", 1), 0),
        (m("p1", 1), 1),
        (m("p1", 2), 0),
        (m("p2", -1), 2),
        (b"\xc1", 1),
    ]:
        await producer.send_and_wait(topic, value, partition=part)

    async with running(app) as worker:

        async def all_seen() -> bool:
            return worker.stats.consumed >= 5

        await eventually(all_seen)
    effects = await pg.fetch("SELECT k FROM test_effects WHERE k LIKE $1", unique + "%")
    assert sorted(r["k"] for r in effects) == [unique + "p1"]
    o = worker.stats.by_outcome
    assert (o["applied"], o["duplicate"], o["conflict"], o["rejected"], o["invalid"]) == (
        1,
        1,
        1,
        1,
        1,
    )
