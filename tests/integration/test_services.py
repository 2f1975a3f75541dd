"""The foundation: each real service answers as the framework needs it to.

These are the bare capabilities the runtime is built on, checked directly against the
services `make services` starts: a produce/consume round trip with a committed group offset,
a Redis ``SET NX PX`` lease, and a PostgreSQL savepoint rolled back inside a transaction.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.conftest import create_topics

pytestmark = pytest.mark.integration


async def test_kafka_round_trip_with_a_committed_offset(settings, producer, unique):
    topic = f"roundtrip-{unique}"
    await create_topics(settings, [topic], partitions=1)
    for i in range(3):
        await producer.send_and_wait(topic, f"v{i}".encode(), key=b"k")
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"g-{unique}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        got: list[bytes] = []
        async with asyncio.timeout(30):
            while len(got) < 3:
                batch = await consumer.getmany(timeout_ms=500)
                got += [r.value for recs in batch.values() for r in recs]
        tp = TopicPartition(topic, 0)
        await consumer.commit({tp: 3})
        assert got == [b"v0", b"v1", b"v2"]
        assert await consumer.committed(tp) == 3
    finally:
        await consumer.stop()


async def test_redis_lease_is_exclusive_and_expires(settings, unique):
    r = aioredis.Redis.from_url(settings.redis_url)
    key = f"lease:{{test-{unique}}}:k"
    try:
        assert await r.set(key, "owner-a", nx=True, px=200)
        assert not await r.set(key, "owner-b", nx=True, px=200)  # held: refused
        assert await r.get(key) == b"owner-a"
        await asyncio.sleep(0.4)  # past its expiry, the lease is free again
        assert await r.set(key, "owner-b", nx=True, px=200)
    finally:
        await r.delete(key)
        await r.aclose()


async def test_postgres_savepoint_rolls_back_only_its_part(pg, unique):
    table = f"sp_{unique}"
    await pg.execute(f"CREATE TABLE {table} (v int)")
    try:
        async with pg.transaction():
            await pg.execute(f"INSERT INTO {table} VALUES (1)")
            await pg.execute("SAVEPOINT s")
            await pg.execute(f"INSERT INTO {table} VALUES (2)")
            await pg.execute("ROLLBACK TO SAVEPOINT s")
            await pg.execute(f"INSERT INTO {table} VALUES (3)")
        assert [r["v"] for r in await pg.fetch(f"SELECT v FROM {table} ORDER BY v")] == [1, 3]
    finally:
        await pg.execute(f"DROP TABLE {table}")
