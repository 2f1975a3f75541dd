"""The two baselines the framework is measured against, each a plain aiokafka loop.

* ``raw``: ``getmany`` and a commit per batch; decodes nothing, writes nothing. The ceiling for
  a Python consumer on this broker. Its check is that it saw every offset exactly once, in order.
* ``naive``: what people write by hand today. Per message: decode and validate, Redis
  ``SET NX PX`` on the key, one PostgreSQL transaction (processed-messages insert, ledger row,
  outbox row), then a Kafka offset commit.

Both use the same fetch settings as the framework's Worker.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import msgpack
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from consumer.outbox.store import shard_of
from schemas.payments import PaymentRequested
from scripts.bench.benchapp import LEDGER_INSERT
from scripts.bench.harness import Control, Meter, watch_assignment

NAIVE_TTL_MS = 3_600_000

OUTBOX_INSERT = """
INSERT INTO dedup.outbox (topic, key, value, headers, shard, idempotency_key)
VALUES ($1, $2, $3, $4::jsonb, $5, $6)
"""


class _HoldUntilGo(ConsumerRebalanceListener):  # type: ignore[misc]
    """Pause partitions assigned before ``go``: nothing is fetched ahead of the start line."""

    def __init__(self, consumer: AIOKafkaConsumer, control: Control) -> None:
        self.consumer = consumer
        self.control = control

    async def on_partitions_revoked(self, revoked: Any) -> None:
        return None

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if not self.control.go.is_set():
            self.consumer.pause(*assigned)


def _consumer(spec: dict[str, Any], control: Control) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=spec["bootstrap"],
        group_id=spec["group"],
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    consumer.subscribe([spec["topic"]], listener=_HoldUntilGo(consumer, control))
    return consumer


async def run(mode: str, spec: dict[str, Any], control: Control, meter: Meter) -> dict[str, Any]:
    consumer = _consumer(spec, control)
    await consumer.start()
    watcher = asyncio.create_task(watch_assignment(consumer.assignment))
    try:
        if not await control.wait_go():
            return {"positions": {}}
        consumer.resume(*consumer.assignment())
        meter.started()
        if mode == "raw":
            positions, gaps = await _raw(consumer, spec, control, meter)
            return {"positions": positions, "gaps": gaps}
        if mode == "naive":
            return {"positions": await _naive(consumer, spec, control, meter)}
        raise ValueError(f"unknown mode {mode!r}")
    finally:
        watcher.cancel()
        await consumer.stop()


async def _raw(
    consumer: AIOKafkaConsumer, spec: dict[str, Any], control: Control, meter: Meter
) -> tuple[dict[int, int], int]:
    limit, batch = spec["limit"], spec["batch"]
    positions: dict[int, int] = {}
    gaps = 0
    while meter.consumed < limit and not control.stop.is_set():
        fetched = await consumer.getmany(timeout_ms=200, max_records=batch)
        if not fetched:
            continue
        commit: dict[TopicPartition, int] = {}
        n = 0
        for tp, recs in fetched.items():
            if not recs:
                continue
            # Each offset exactly once, in order: the raw leg's exactly-once check.
            if recs[0].offset != positions.get(tp.partition, 0):
                gaps += 1
            positions[tp.partition] = commit[tp] = recs[-1].offset + 1
            n += len(recs)
        await consumer.commit(commit)
        meter.done(n)
    return positions, gaps


async def _naive(
    consumer: AIOKafkaConsumer, spec: dict[str, Any], control: Control, meter: Meter
) -> dict[int, int]:
    limit, batch, leg, out_topic = spec["limit"], spec["batch"], spec["group"], spec["out_topic"]
    redis = aioredis.Redis.from_url(spec["redis_url"])
    conn = await asyncpg.connect(spec["dsn"])
    positions: dict[int, int] = {}
    try:
        while meter.consumed < limit and not control.stop.is_set():
            fetched = await consumer.getmany(timeout_ms=200, max_records=batch)
            if not fetched:
                continue
            n = 0
            for tp, recs in fetched.items():
                for rec in recs:
                    if meter.consumed + n >= limit:
                        break
                    p = PaymentRequested.model_validate(msgpack.unpackb(rec.value, raw=False))
                    first = await redis.set(
                        f"bench-naive:{{{leg}}}:{p.payment_id}", "1", nx=True, px=NAIVE_TTL_MS
                    )
                    if first:
                        async with conn.transaction():
                            new = await conn.fetchval(
                                "INSERT INTO bench_naive_inbox (leg, key) VALUES ($1, $2) "
                                "ON CONFLICT DO NOTHING RETURNING 1",
                                leg,
                                p.payment_id,
                            )
                            if new:
                                await conn.execute(
                                    LEDGER_INSERT, leg, p.payment_id, p.account, p.cents
                                )
                                key = p.account.encode()
                                value = msgpack.packb(
                                    {
                                        "payment_id": p.payment_id,
                                        "account": p.account,
                                        "cents": p.cents,
                                    }
                                )
                                await conn.execute(
                                    OUTBOX_INSERT,
                                    out_topic,
                                    key,
                                    value,
                                    json.dumps([["content-type", "application/msgpack"]]),
                                    shard_of(out_topic, key),
                                    f"{leg}:{p.payment_id}",
                                )
                    await consumer.commit({tp: rec.offset + 1})
                    positions[tp.partition] = rec.offset + 1
                    n += 1
            meter.done(n)
    finally:
        await conn.close()
        await redis.aclose()
    return positions
