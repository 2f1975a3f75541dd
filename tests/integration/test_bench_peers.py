"""The bench's hand-written peers (scripts/bench/competent.py, limit.py) keep exactly once.

``make bench`` checks each leg end to end (one ledger row and one outbox row per key
consumed), but its topic has no conflicting copy and no stale writer. Here both writers get
fetches with every case, against the real PostgreSQL: new keys applied once with the bench
app's rows, a re-sent copy (same payload hash) not applied again, a copy with another payload
counted as a conflict and not applied (in a later fetch and within one fetch), and a stale
position (a previous owner's late batch) not moving the stored one back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgpack
import pytest
from aiokafka import TopicPartition

from consumer.outbox.store import shard_of
from scripts.bench import competent, handwritten, limit
from scripts.bench.store import BENCH_SQL

pytestmark = pytest.mark.asyncio

WRITERS = {"competent": competent.write, "limit": limit.write}


@dataclass
class Rec:
    offset: int
    value: bytes
    timestamp: int = 0


def payment(key: str, cents: int, resend: int = 0) -> bytes:
    """A PaymentRequested; ``resend`` changes only the fields left out of the hash."""
    return msgpack.packb(
        {
            "payment_id": key,
            "account": f"acct-{key}",
            "cents": cents,
            "sent_at": f"2026-01-01T00:00:{resend:02d}+00:00",
            "trace_id": f"trace-{resend}",
        }
    )


def fetch(topic: str, by_partition: dict[int, list[tuple[int, bytes]]]) -> Any:
    return {
        TopicPartition(topic, p): [Rec(o, v) for o, v in recs] for p, recs in by_partition.items()
    }


@pytest.fixture
async def books(pg: asyncpg.Connection, unique: str) -> handwritten.Books:
    await pg.execute(BENCH_SQL)
    await pg.execute(handwritten.SCHEMA_SQL)
    return handwritten.Books(f"peer-{unique}", f"in-{unique}", f"out-{unique}", pg)


async def ledger(pg: asyncpg.Connection, leg: str) -> list[tuple[str, int]]:
    rows = await pg.fetch(
        "SELECT key, cents FROM bench_ledger WHERE leg = $1 ORDER BY key, id", leg
    )
    return [(r["key"], r["cents"]) for r in rows]


async def outbox(pg: asyncpg.Connection, leg: str) -> list[dict[str, Any]]:
    rows = await pg.fetch(
        "SELECT topic, key, value, headers, shard, idempotency_key FROM dedup.outbox "
        "WHERE idempotency_key LIKE $1 || ':%' ORDER BY idempotency_key",
        leg,
    )
    return [dict(r) for r in rows]


@pytest.mark.parametrize("mode", sorted(WRITERS))
async def test_applies_new_keys_once_counts_conflicts_and_keeps_positions_forward(
    mode: str, books: handwritten.Books, pg: asyncpg.Connection
) -> None:
    write, leg, topic = WRITERS[mode], books.leg, books.topic

    first = fetch(
        topic,
        {
            0: [(0, payment("a", 100)), (1, payment("b", 200)), (2, payment("a", 100, resend=1))],
            1: [(0, payment("c", 300))],
        },
    )
    assert await write(books, handwritten.decode(first)) == (3, 0)
    assert await ledger(pg, leg) == [("a", 100), ("b", 200), ("c", 300)]
    rows = await outbox(pg, leg)
    assert [r["idempotency_key"] for r in rows] == [f"{leg}:a", f"{leg}:b", f"{leg}:c"]
    a = rows[0]
    assert a["topic"] == books.out_topic and a["key"] == b"acct-a"
    assert a["shard"] == shard_of(books.out_topic, b"acct-a")
    assert msgpack.unpackb(a["value"]) == {"payment_id": "a", "account": "acct-a", "cents": 100}
    assert json.loads(a["headers"]) == [
        ["content-type", "application/msgpack"],
        ["idempotency-key", f"{leg}:a"],
        ["source", f"{topic}/0/0"],
    ]
    assert await handwritten.stored_positions(pg, leg) == {0: 3, 1: 1}

    # b re-sent (same payload, new transport fields): not applied. a with another amount, in
    # a later fetch: a conflict. d new, then d again with another amount in the same fetch.
    second = fetch(
        topic,
        {
            0: [
                (3, payment("b", 200, resend=2)),
                (4, payment("a", 999)),
                (5, payment("d", 400)),
                (6, payment("d", 401)),
            ]
        },
    )
    assert await write(books, handwritten.decode(second)) == (1, 2)
    assert await ledger(pg, leg) == [("a", 100), ("b", 200), ("c", 300), ("d", 400)]
    assert len(await outbox(pg, leg)) == 4
    assert await handwritten.stored_positions(pg, leg) == {0: 7, 1: 1}

    # A previous owner's late batch of partition 1, after the new owner moved on to 9: the
    # copy is not re-applied and the older position does not move the stored one back.
    await pg.execute(
        "UPDATE bench_positions SET next_offset = 9 WHERE leg = $1 AND partition = 1", leg
    )
    stale = fetch(topic, {1: [(0, payment("c", 300))]})
    assert await write(books, handwritten.decode(stale)) == (0, 0)
    assert await handwritten.stored_positions(pg, leg) == {0: 7, 1: 9}
    assert await ledger(pg, leg) == [("a", 100), ("b", 200), ("c", 300), ("d", 400)]
