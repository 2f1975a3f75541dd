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
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from scripts.toolkit.topics import read_partition


@dataclass(frozen=True, slots=True)
class Rec:
    """One Kafka record, headers decoded (last value of a name wins)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]
    generation: int = 0  # 0: the topic as it is now; k: its k-th deleted incarnation

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
    # generation -> partition -> stored position when that incarnation was deleted
    retired_consumed: dict[int, dict[int, int]] = field(default_factory=dict)
    # PostgreSQL lost committed transactions (postgres_restore, postgres_failover_async): a
    # rejection it forgot is decided again, maybe at another copy of the key, which is
    # dead-lettered too. The first dead letter is out in Kafka already (at least once).
    db_rewound: bool = False


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


async def read_topic(
    bootstrap: str,
    topic: str,
    partitions: int,
    unparseable: dict[tuple[int, int], dict[str, str]] | None = None,
) -> list[Rec]:
    """Every record of ``topic``, from offset 0 to the current end of each partition.

    ``unparseable`` names records aiokafka cannot parse (a header name that is not UTF-8,
    put there by the ``unparseable_record`` fault), by ``(partition, offset)``, with the
    headers to report for them. aiokafka raises on a fetch that contains one, without
    returning the records before it, so around them the partition is read one record batch
    per fetch until the fetch that raises is the unparseable record's alone.
    """
    unparseable = unparseable or {}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    # One batch per fetch (the broker always returns at least one whole batch).
    careful = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=1,
    )
    await consumer.start()
    await careful.start()
    out: list[Rec] = []
    try:
        for p in range(partitions):
            tp = TopicPartition(topic, p)
            end = (await consumer.end_offsets([tp]))[tp]
            pos = 0
            while pos < end:
                pos = await _read(consumer, tp, pos, end, out)
                if pos < end:  # a fetch at pos raised: find the record that cannot be parsed
                    pos = await _read_around(careful, tp, pos, end, out, unparseable)
    finally:
        await consumer.stop()
        await careful.stop()
    return out


async def _read(
    consumer: AIOKafkaConsumer, tp: TopicPartition, pos: int, end: int, out: list[Rec]
) -> int:
    """Read ``tp`` from ``pos`` towards ``end``; the position reached (short of ``end`` if a
    fetch raised)."""
    records: list[ConsumerRecord[bytes, bytes]] = []
    pos, _ = await read_partition(consumer, tp, pos, end, records)
    out.extend(Rec(r.partition, r.offset, r.key, r.value, _headers(r.headers)) for r in records)
    return pos


async def _read_around(
    careful: AIOKafkaConsumer,
    tp: TopicPartition,
    pos: int,
    end: int,
    out: list[Rec],
    unparseable: dict[tuple[int, int], dict[str, str]],
) -> int:
    """Read one record batch per fetch up to the record that cannot be parsed; report it with
    the headers ``unparseable`` names for it, and return the position after it."""
    records: list[ConsumerRecord[bytes, bytes]] = []
    at, error = await read_partition(careful, tp, pos, end, records)
    out.extend(Rec(r.partition, r.offset, r.key, r.value, _headers(r.headers)) for r in records)
    if error is None:
        return at
    headers = unparseable.get((tp.partition, at))
    if headers is None:
        raise RuntimeError(f"{tp.topic}/{tp.partition}/{at}: cannot parse ({error})") from error
    out.append(Rec(tp.partition, at, None, None, headers))
    return at + 1


async def stored_offsets(conn: asyncpg.Connection) -> dict[tuple[str, str, int], int]:
    rows = await conn.fetch("SELECT group_id, topic, partition, next_offset FROM dedup.offsets")
    return {(r[0], r[1], r[2]): r[3] for r in rows}


async def outbox_pending(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM dedup.outbox WHERE published_at IS NULL"))


async def collect(
    bootstrap: str,
    dsn: str,
    topics: dict[str, int],
    unparseable: dict[tuple[str, int, int], dict[str, str]] | None = None,
) -> Evidence:
    """Read ``{topic: partitions}`` and the tables (``unparseable``: see :func:`read_topic`)."""
    ev = Evidence()
    for t, n in topics.items():
        known = {(p, o): h for (tt, p, o), h in (unparseable or {}).items() if tt == t}
        ev.topics[t] = await read_topic(bootstrap, t, n, known)
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
