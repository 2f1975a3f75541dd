"""Evidence for the checker, read once the processes are stopped: topics and tables, raw.

Reads whole topics from the beginning (no consumer group) and the tables the payments and
downstream apps write. Interprets nothing: that is ``checker.py``'s job. Also answers the
campaign's "is everything consumed yet?" question while the processes still run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition


@dataclass(frozen=True, slots=True)
class Rec:
    """One Kafka record, headers decoded (last value of a name wins)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]

    def source(self, topic: str) -> str:
        return f"{topic}/{self.partition}/{self.offset}"


@dataclass
class Evidence:
    topics: dict[str, list[Rec]] = field(default_factory=dict)
    ledger: list[tuple[str, str, str, int]] = field(default_factory=list)  # tenant, pid, ...
    inbox: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    offsets: dict[tuple[str, str, int], int] = field(default_factory=dict)
    outbox_pending: int = 0
    downstream: list[dict[str, Any]] = field(default_factory=list)


def _headers(raw: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in raw or ():
        out[name.lower()] = bytes(value).decode(errors="replace") if value is not None else ""
    return out


async def end_offsets(bootstrap: str, topics: dict[str, int]) -> dict[tuple[str, int], int]:
    """End offset of every partition of ``{topic: partitions}``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t, n in topics.items() for p in range(n)]
        ends = await consumer.end_offsets(tps)
        return {(tp.topic, tp.partition): off for tp, off in ends.items()}
    finally:
        await consumer.stop()


async def read_topic(bootstrap: str, topic: str, partitions: int) -> list[Rec]:
    """Every record of ``topic``, from offset 0 to the current end of each partition."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    out: list[Rec] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        left = {tp for tp in tps if ends[tp] > 0}
        while left:
            batch = await consumer.getmany(*left, timeout_ms=1000, max_records=5000)
            for recs in batch.values():
                for r in recs:
                    out.append(Rec(r.partition, r.offset, r.key, r.value, _headers(r.headers)))
            for tp in list(left):
                if await consumer.position(tp) >= ends[tp]:
                    left.discard(tp)
    finally:
        await consumer.stop()
    return out


async def stored_offsets(conn: asyncpg.Connection) -> dict[tuple[str, str, int], int]:
    rows = await conn.fetch("SELECT group_id, topic, partition, next_offset FROM dedup.offsets")
    return {(r[0], r[1], r[2]): r[3] for r in rows}


async def outbox_pending(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM dedup.outbox WHERE published_at IS NULL"))


async def collect(bootstrap: str, dsn: str, topics: dict[str, int]) -> Evidence:
    """Read ``{topic: partitions}`` and the tables."""
    ev = Evidence()
    for t, n in topics.items():
        ev.topics[t] = await read_topic(bootstrap, t, n)
    conn = await asyncpg.connect(dsn)
    try:
        ev.ledger = [
            (r[0], r[1], r[2], r[3])
            for r in await conn.fetch("SELECT tenant, payment_id, account, cents FROM ledger")
        ]
        for r in await conn.fetch(
            'SELECT namespace, key, payload_hash, status, topic, partition, "offset", reason '
            "FROM dedup.inbox"
        ):
            ev.inbox[(r[0], r[1])] = dict(r)
        ev.offsets = await stored_offsets(conn)
        ev.outbox_pending = await outbox_pending(conn)
        with contextlib.suppress(asyncpg.UndefinedTableError):
            ev.downstream = [
                dict(r)
                for r in await conn.fetch(
                    "SELECT namespace, idempotency_key, payment_id, account, cents, source "
                    "FROM chaos_downstream_effects"
                )
            ]
    finally:
        await conn.close()
    return ev
