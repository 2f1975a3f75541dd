"""Redis done markers belong to one database: a marker written under another epoch
(a recreated or restored database) never makes a message look done."""

from __future__ import annotations

import msgpack
import pytest
import redis.asyncio as aioredis

from consumer import App, Context
from consumer.constants import done_key
from consumer.dedup.hashing import HASH_VERSION, marker_digest
from consumer.dedup.identity import identify
from consumer.message import Message
from schemas.payments import PaymentRequested
from tests.conftest import app_settings, eventually, running

pytestmark = pytest.mark.integration


async def test_a_done_marker_from_another_database_is_ignored(
    settings, topics, producer, pg, unique
):
    topic = await topics("epoch", partitions=1)
    app = App(f"g-{unique}", settings=app_settings(settings, relay_enabled=False))
    calls: list[str] = []

    @app.handler(topic, schema=PaymentRequested, key=lambda p: p.payment_id)
    async def settle(p: PaymentRequested, ctx: Context) -> None:
        calls.append(p.payment_id)

    value = msgpack.packb({"payment_id": "p1", "account": "a", "cents": 5})
    handler = app.handler_for(topic)
    assert handler is not None
    ident = identify(handler, Message(topic, 0, 0, None, value))
    epoch = await pg.fetchval("SELECT value FROM dedup.meta WHERE name = 'epoch'")
    r = aioredis.Redis.from_url(settings.redis_url)
    stale = done_key(ident.namespace, "p1", "another-db")
    try:
        # Same key, same hash, "done" — but recorded by a different database.
        await r.set(stale, f"done:{marker_digest(ident.hash, HASH_VERSION)}", ex=60)
        await producer.send_and_wait(topic, value, partition=0)
        async with running(app) as worker:

            async def seen() -> bool:
                return worker.stats.consumed >= 1

            await eventually(seen)
        assert calls == ["p1"]
        assert worker.stats.by_outcome["applied"] == 1
        # And this database's own marker is what a later copy would find.
        assert (
            await r.get(done_key(ident.namespace, "p1", epoch))
            == f"done:{marker_digest(ident.hash, HASH_VERSION)}".encode()
        )
    finally:
        await r.delete(stale, done_key(ident.namespace, "p1", epoch))
        await r.aclose()
