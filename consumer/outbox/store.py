"""SQL for ``dedup.outbox``. Rows are written only inside a batch transaction.

A row's ``shard`` is a stable hash of (topic, key): the relay publishes one shard at a time
in id order, which keeps per-key order even with several relays (see docs/outbox.md).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from consumer.constants import NOTIFY_CHANNEL, OUTBOX_SHARDS

Query = tuple[str, list[Any]]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, str], ...]
    idempotency_key: str

    @property
    def shard(self) -> int:
        return shard_of(self.topic, self.key)


def shard_of(topic: str, key: bytes | None) -> int:
    return zlib.crc32(topic.encode() + b"\x00" + (key or b"")) % OUTBOX_SHARDS


def insert(rows: Sequence[OutboxRow]) -> Query:
    # One statement for the whole batch; the NOTIFY is delivered only if the transaction commits.
    return (
        f"""
        WITH ins AS (
            INSERT INTO dedup.outbox (topic, key, value, headers, shard, idempotency_key)
            SELECT t.topic, t.key, t.value, t.headers::jsonb, t.shard, t.ik
            FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::text[], $5::int[], $6::text[])
                 WITH ORDINALITY AS t(topic, key, value, headers, shard, ik, n)
            ORDER BY t.n
            RETURNING 1
        )
        SELECT pg_notify('{NOTIFY_CHANNEL}', '') FROM (SELECT count(*) FROM ins) c
        """,
        [
            [r.topic for r in rows],
            [r.key for r in rows],
            [r.value for r in rows],
            [json.dumps(list(r.headers)) for r in rows],
            [r.shard for r in rows],
            [r.idempotency_key for r in rows],
        ],
    )


def claim_shards(lock_base: int, start: int, limit: int) -> Query:
    # Shard ownership is an advisory lock held for the relay's transaction: rows of one shard
    # (hence of one destination key) are published by one relay at a time, in id order.
    # FOR UPDATE SKIP LOCKED alone would let two relays publish rows of one key out of order.
    return (
        f"""
        SELECT s FROM (
            SELECT (g + $2) % {OUTBOX_SHARDS} AS s FROM generate_series(0, {OUTBOX_SHARDS - 1}) g
        ) shards
        WHERE EXISTS (SELECT 1 FROM dedup.outbox o WHERE o.shard = shards.s
                      AND o.published_at IS NULL)
          AND pg_try_advisory_xact_lock($1, shards.s)
        LIMIT $3
        """,
        [lock_base, start, limit],
    )


def pending(shards: Sequence[int], limit: int) -> Query:
    return (
        """
        SELECT id, topic, key, value, headers FROM dedup.outbox
        WHERE shard = ANY($1::int[]) AND published_at IS NULL
        ORDER BY id LIMIT $2
        """,
        [list(shards), limit],
    )


def mark_published(ids: Sequence[int]) -> Query:
    return (
        "UPDATE dedup.outbox SET published_at = now() WHERE id = ANY($1::bigint[])",
        [list(ids)],
    )


def backlog() -> Query:
    return (
        """
        SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8
        FROM dedup.outbox WHERE published_at IS NULL
        """,
        [],
    )


def purge_published(older_than_s: int, limit: int) -> Query:
    # Small batches through the partial index on published_at: no long locks.
    return (
        """
        DELETE FROM dedup.outbox WHERE id = ANY(ARRAY(
            SELECT id FROM dedup.outbox
            WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1)
            LIMIT $2))
        """,
        [float(older_than_s), limit],
    )
