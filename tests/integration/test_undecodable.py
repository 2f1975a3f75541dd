"""A record the Kafka client cannot parse is dead-lettered, raw; its partition moves on
(issue 13, finding 14).

aiokafka decodes header NAMES as UTF-8 inside ``getmany()``; the broker stores them as bytes.
The record here is written with a hand-built record batch and a raw ProduceRequest (no client
would produce it), between good records, on one partition of three.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

from consumer import App, Context
from consumer.runtime import undecodable
from tests.conftest import app_settings, read_topic, running
from tests.integration.dedup_support import Pay, cleanup, send, wait_offset

pytestmark = pytest.mark.integration

EFFECTS = "CREATE TABLE IF NOT EXISTS test_undecodable_effects (k text NOT NULL)"
BAD_NAME = b"x-\xff\xfe-name"


class _RawName(str):
    """A header name the builder writes as these exact bytes (not UTF-8)."""

    raw: bytes

    def encode(self, *_: Any, **__: Any) -> bytes:  # type: ignore[override]
        return self.raw


def _name(raw: bytes) -> str:
    n = _RawName("x")
    n.raw = raw
    return n


async def _produce_raw(
    settings: Any, topic: str, partition: int, records: list[tuple[bytes, list[Any]]]
) -> None:
    """One record batch, built by hand, appended with a raw ProduceRequest (acks=all)."""
    builder = _DefaultRecordBatchBuilderPy(2, 0, 0, -1, -1, -1, 1 << 20)
    for i, (value, headers) in enumerate(records):
        assert builder.append(i, timestamp=None, key=None, value=value, headers=headers)
    data = bytes(builder.build())
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        request = ProduceRequest(
            required_acks=-1,
            timeout=10_000,
            topics=[(topic, [(partition, data)])],
            transactional_id=None,
        )
        tp = __import__("aiokafka").TopicPartition(topic, partition)
        # What aiokafka's own sender does: a fresh topic's leader may not be elected yet
        # (NOT_LEADER_OR_FOLLOWER 6, UNKNOWN_TOPIC_OR_PARTITION 3, LEADER_NOT_AVAILABLE 5):
        # refresh the metadata and send again, a bounded number of times.
        for _ in range(50):
            await producer.client.force_metadata_update()
            leader = producer.client.cluster.leader_for_partition(tp)
            if leader is None or leader == -1:
                await asyncio.sleep(0.1)
                continue
            response = await producer.client.send(leader, request)
            errors = [p[1] for _, parts in response.topics for p in parts]
            if errors not in ([3], [5], [6]):
                break
            await asyncio.sleep(0.1)
        assert errors == [0], response
    finally:
        await producer.stop()


async def test_unparseable_header_name_is_dead_lettered_and_every_partition_moves_on(
    settings, topics, producer, pg, unique
):
    topic = await topics("undecodable", partitions=3)
    group = f"g-{unique}"
    await pg.execute(EFFECTS)
    app = App(group, settings=app_settings(settings, relay_enabled=True))

    @app.handler(topic, schema=Pay, key=lambda p: p.id)
    async def apply(p: Pay, ctx: Context) -> None:
        await ctx.db.execute("INSERT INTO test_undecodable_effects VALUES ($1)", p.id)

    bad_value = msgpack.packb({"id": f"bad-{unique}"})
    try:
        await send(producer, topic, {"id": f"before-{unique}"}, partition=0)  # offset 0
        # offsets 1, 2, 3: good, bad (header name not UTF-8), good: one batch
        await _produce_raw(
            settings,
            topic,
            0,
            [
                (msgpack.packb({"id": f"in1-{unique}"}), []),
                (bad_value, [("ok", b"1"), (_name(BAD_NAME), b"v")]),
                (msgpack.packb({"id": f"in3-{unique}"}), []),
            ],
        )
        await send(producer, topic, {"id": f"after-{unique}"}, partition=0)  # offset 4
        for p in (1, 2):
            await send(producer, topic, {"id": f"other{p}-{unique}"}, partition=p)
        async with running(app):
            await wait_offset(pg, group, topic, 0, 5)
            await wait_offset(pg, group, topic, 1, 1)
            await wait_offset(pg, group, topic, 2, 1)
            dead = await read_topic(settings, topic + ".dlq", expect=1)
        rows = await pg.fetch(
            "SELECT k FROM test_undecodable_effects WHERE k LIKE $1", f"%{unique}"
        )
        assert sorted(r[0] for r in rows) == sorted(
            f"{k}-{unique}" for k in ("before", "in1", "in3", "after", "other1", "other2")
        )
        assert len(dead) == 1
        headers = {k: v for k, v in dead[0].headers}
        assert headers["x-reason"] == b"undecodable"
        assert headers["x-source"] == f"{topic}/0/2".encode()
        assert BAD_NAME.hex().encode() in headers["x-detail"]
        # The raw bytes of the record as written: its value and the bad name are in them.
        assert bad_value in dead[0].value and BAD_NAME in dead[0].value
    finally:
        await pg.execute("DELETE FROM test_undecodable_effects WHERE k LIKE $1", f"%{unique}")
        await cleanup(pg, unique)


async def test_other_consumers_in_the_process_keep_aiokafkas_behaviour(settings, topics):
    """Outside the worker's fetch loop the wrapper changes nothing: aiokafka raises."""
    topic = await topics("undecodable-plain", partitions=1)
    undecodable.install()
    await _produce_raw(settings, topic, 0, [(b"v", [(_name(BAD_NAME), b"v")])])
    with pytest.raises(UnicodeDecodeError):
        await read_topic(settings, topic)


@pytest.mark.parametrize("compression", ["gzip", "snappy", "lz4", "zstd"])
async def test_every_kafka_codec_is_readable(settings, topics, pg, unique, compression):
    """A producer elsewhere picks the codec; a missing one would make every batch unreadable."""
    topic = await topics(f"codec-{compression}", partitions=1)
    group = f"g-{unique}"
    await pg.execute(EFFECTS)
    app = App(group, settings=app_settings(settings, relay_enabled=False))

    @app.handler(topic, schema=Pay, key=lambda p: p.id)
    async def apply(p: Pay, ctx: Context) -> None:
        await ctx.db.execute("INSERT INTO test_undecodable_effects VALUES ($1)", p.id)

    p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, compression_type=compression)
    await p.start()
    try:
        for i in range(3):
            await p.send(topic, msgpack.packb({"id": f"c{i}-{unique}"}), partition=0)
        await p.flush()
    finally:
        await p.stop()
    try:
        async with running(app):
            await wait_offset(pg, group, topic, 0, 3)
        rows = await pg.fetch(
            "SELECT k FROM test_undecodable_effects WHERE k LIKE $1", f"%{unique}"
        )
        assert len(rows) == 3
    finally:
        await pg.execute("DELETE FROM test_undecodable_effects WHERE k LIKE $1", f"%{unique}")
        await cleanup(pg, unique)
