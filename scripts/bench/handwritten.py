"""The framework's hand-written peers: ``competent`` and ``limit`` (one worker process each).

``python -m scripts.bench.handwritten '<json spec>'``, started by legs.py like
``scripts.bench.worker`` and speaking the same protocol (harness.py). Both legs do the bench
app's business work (benchapp.py: one ledger row and one outbox row per new key) and keep
their own books, the way a strong engineer writes it by hand in a day:

* ``getmany``; every record decoded with msgpack and validated with the same pydantic model
  (``PaymentRequested``), hashed without its transport fields (``sent_at``, ``trace_id``, as
  the bench app's ``hash_exclude``), only the first copy of a key in a fetch kept;
* a processed table (``bench_processed``: key + payload hash) whose
  ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` says which keys are new; a copy whose hash
  differs from the stored one is a conflict: counted, never applied;
* positions in a table (``bench_positions``), read at assignment (``seek``), moved forward
  only, in the transaction that wrote the effects; then the Kafka commit (advisory only).

How the rows are sent is the difference: competent.py (one transaction per partition batch,
one statement per kind of row) and limit.py (one statement for the whole fetch). Redis is not
used: the processed table is the fence, and neither leg runs a copy twice concurrently
because a partition has one owner (a rebalance's overlap is settled by the primary key).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgpack
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from schemas.payments import PaymentRequested
from scripts.bench.harness import Control, Meter, emit, watch_assignment

MODES = ("competent", "limit")
HASH_EXCLUDE = {"sent_at", "trace_id"}  # as benchapp.py's hash_exclude

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS bench_processed (
    leg           text        NOT NULL,
    key           text        NOT NULL,
    payload_hash  bytea       NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (leg, key)
);
CREATE TABLE IF NOT EXISTS bench_positions (
    leg          text    NOT NULL,
    topic        text    NOT NULL,
    partition    integer NOT NULL,
    next_offset  bigint  NOT NULL,
    PRIMARY KEY (leg, topic, partition)
);
"""
RESET_SQL = "TRUNCATE bench_processed, bench_positions"

# Upsert that only moves forward: after a rebalance the previous owner may still commit an
# older batch of the partition; its effects are refused by the processed table, its position
# must not move the new owner's back.
POSITION_UPSERT = """
INSERT INTO bench_positions (leg, topic, partition, next_offset)
SELECT $1, $2, p, o FROM unnest($3::int[], $4::bigint[]) AS t(p, o)
ON CONFLICT (leg, topic, partition)
DO UPDATE SET next_offset = GREATEST(bench_positions.next_offset, EXCLUDED.next_offset)
"""


async def reset(dsn: str) -> None:
    """Create the two legs' tables if needed and empty them (before each of their legs)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA_SQL)
        await conn.execute(RESET_SQL)
    finally:
        await conn.close()


async def stored_positions(conn: asyncpg.Connection, leg: str) -> dict[int, int]:
    """The next offsets ``leg`` stored (what it resumes from, and what it is checked at)."""
    rows = await conn.fetch(
        "SELECT partition, next_offset FROM bench_positions WHERE leg = $1", leg
    )
    return {r[0]: r[1] for r in rows}


@dataclass(slots=True)
class Decoded:
    """One partition's records of a fetch: the first copy of each key, decoded and hashed."""

    partition: int
    next_offset: int  # the offset after the batch's last record
    keys: list[str] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)
    cents: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    conflicts: int = 0  # later copies in this fetch with another hash (not applied)


def payload_hash(p: PaymentRequested) -> bytes:
    """BLAKE2b of the validated payload without its transport fields (field order is fixed)."""
    return hashlib.blake2b(
        p.model_dump_json(exclude=HASH_EXCLUDE).encode(), digest_size=16
    ).digest()


def decode(fetched: Mapping[TopicPartition, Sequence[Any]]) -> list[Decoded]:
    """Decode, validate and hash a fetch; a key's later copies in it are dropped or counted.

    The bench's topic holds no malformed record; a real loop would dead-letter one here.
    """
    first: dict[str, bytes] = {}
    out = []
    for tp, recs in fetched.items():
        if not recs:
            continue
        d = Decoded(tp.partition, recs[-1].offset + 1)
        for rec in recs:
            p = PaymentRequested.model_validate(msgpack.unpackb(rec.value, raw=False))
            h = payload_hash(p)
            seen = first.get(p.payment_id)
            if seen is not None:
                d.conflicts += seen != h
                continue
            first[p.payment_id] = h
            d.keys.append(p.payment_id)
            d.hashes.append(h)
            d.accounts.append(p.account)
            d.cents.append(p.cents)
            d.offsets.append(rec.offset)
        out.append(d)
    return out


def settled_value(key: str, account: str, cents: int) -> bytes:
    """The outbox row's value: what the bench app's ``ctx.publish`` encodes (msgpack)."""
    packed: bytes = msgpack.packb(
        {"payment_id": key, "account": account, "cents": cents}, use_bin_type=True
    )
    return packed


def headers_json(leg: str, key: str, topic: str, partition: int, offset: int) -> str:
    """The outbox row's headers: content type, idempotency key, source (as the framework's)."""
    return json.dumps(
        [
            ["content-type", "application/msgpack"],
            ["idempotency-key", f"{leg}:{key}"],
            ["source", f"{topic}/{partition}/{offset}"],
        ]
    )


@dataclass(frozen=True, slots=True)
class Books:
    """Where a leg writes: its name (ledger ``leg``, processed ``leg``), topics, connection."""

    leg: str
    topic: str
    out_topic: str
    conn: asyncpg.Connection


# A writer applies one fetch and returns (keys applied, conflicts seen); it has committed
# everything (effects and positions) when it returns.
Writer = Callable[[Books, list[Decoded]], Awaitable[tuple[int, int]]]


class _StoredPositions(ConsumerRebalanceListener):  # type: ignore[misc]
    """At assignment: seek to the stored positions; before ``go``: hold the partitions."""

    def __init__(self, consumer: AIOKafkaConsumer, control: Control, pool: Any, leg: str):
        self.consumer, self.control, self.pool, self.leg = consumer, control, pool, leg

    async def on_partitions_revoked(self, revoked: Any) -> None:
        return None

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if not self.control.go.is_set():
            self.consumer.pause(*assigned)  # nothing fetched ahead of the start line
        # Its own connection: the loop's may be in the middle of a batch.
        async with self.pool.acquire() as conn:
            stored = await stored_positions(conn, self.leg)
        for tp in assigned:
            if tp.partition in stored:
                self.consumer.seek(tp, stored[tp.partition])
            # No row: nothing of it was applied; Kafka's committed offset (never ahead of the
            # table, it is committed after) or the topic's start.


def _writer(mode: str) -> Writer:
    if mode == "competent":
        from scripts.bench.competent import write
    elif mode == "limit":
        from scripts.bench.limit import write
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return write


async def run(spec: dict[str, Any], control: Control, meter: Meter) -> dict[str, Any]:
    write = _writer(spec["mode"])
    leg, latency = spec["group"], bool(spec.get("latency"))
    pool = await asyncpg.create_pool(spec["dsn"], min_size=2, max_size=2)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=spec["bootstrap"],
        group_id=leg,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=4 * 1024 * 1024,  # as the framework's Worker
    )
    consumer.subscribe([spec["topic"]], listener=_StoredPositions(consumer, control, pool, leg))
    applied = conflicts = 0
    await consumer.start()
    watcher = asyncio.create_task(watch_assignment(consumer.assignment))
    try:
        if not await control.wait_go():
            return {"applied": 0, "conflicts": 0}
        consumer.resume(*consumer.assignment())
        meter.started()
        async with pool.acquire() as conn:
            books = Books(leg, spec["topic"], spec["out_topic"], conn)
            while not control.stop.is_set():
                fetched = await consumer.getmany(timeout_ms=200, max_records=spec["batch"])
                if not fetched:
                    continue
                new, bad = await write(books, decode(fetched))
                applied, conflicts = applied + new, conflicts + bad
                if latency:  # after COMMIT, before the Kafka commit: as the framework legs
                    now_ms = time.time() * 1000
                    meter.latencies_ms.extend(
                        now_ms - r.timestamp for recs in fetched.values() for r in recs
                    )
                try:
                    await consumer.commit({tp: recs[-1].offset + 1 for tp, recs in fetched.items()})
                except (CommitFailedError, IllegalStateError):
                    pass  # revoked meanwhile: the table has the position, Kafka's is advisory
                meter.done(sum(len(recs) for recs in fetched.values()))
    finally:
        watcher.cancel()
        await consumer.stop()
        await pool.close()
    return {"applied": applied, "conflicts": conflicts}


async def main(spec: dict[str, Any]) -> None:
    control = Control()
    control.start()
    meter = Meter()
    try:
        extra = await run(spec, control, meter)
    except Exception as exc:
        logging.exception("bench worker failed")
        extra = {"error": f"{type(exc).__name__}: {exc}"}
    emit(meter.report(**extra))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(json.loads(sys.argv[1])))
