"""SQL for ``dedup.outbox``. Rows are written only inside a transaction: a batch's, or the
caller's own (consumer/outbox/writer.py).

A row's ``shard`` is a stable hash of (topic, key). The relay owns a shard through an advisory
lock held for its transaction and publishes the shard's rows in id order, which keeps per-key
order even with several relays (docs/outbox.md explains why ``FOR UPDATE SKIP LOCKED`` alone
does not). Each function returns ``(text, args)`` so the queries can be read as strings.
This module never talks to Kafka.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from consumer.constants import NOTIFY_CHANNEL, OUTBOX_SHARDS
from consumer.types import Query

Destination = tuple[str, bytes | None]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One outgoing message, as the batch transaction writes it."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, str], ...]
    idempotency_key: str

    @property
    def shard(self) -> int:
        return shard_of(self.topic, self.key)


@dataclass(frozen=True, slots=True)
class Blocked:
    """Destinations the relay holds back after a failed send: whole topics, or (topic, key)."""

    topics: Collection[str] = ()
    keys: Collection[Destination] = ()


def shard_of(topic: str, key: bytes | None) -> int:
    """Stable across processes and versions: all rows for one (topic, key) share a shard."""
    return zlib.crc32(topic.encode() + b"\x00" + (key or b"")) % OUTBOX_SHARDS


def insert_rows(rows: Sequence[OutboxRow]) -> Query:
    """The INSERT alone (no NOTIFY): ORDER BY t.n makes the bigserial ids follow the order
    the handler published in. consumer/db/flush.py embeds it in the batch's one statement."""
    return (
        """
            INSERT INTO dedup.outbox (topic, key, value, headers, shard, idempotency_key)
            SELECT t.topic, t.key, t.value, t.headers::jsonb, t.shard, t.ik
            FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::text[], $5::int[], $6::text[])
                 WITH ORDINALITY AS t(topic, key, value, headers, shard, ik, n)
            ORDER BY t.n
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


# Wakes the relay (consumer/outbox/wakeup.py); delivered only if the transaction commits.
NOTIFY = f"pg_notify('{NOTIFY_CHANNEL}', '')"


def insert(rows: Sequence[OutboxRow]) -> Query:
    # One statement for the whole batch, and the NOTIFY with it.
    text, args = insert_rows(rows)
    return (
        f"WITH ins AS ({text} RETURNING 1) SELECT {NOTIFY} FROM (SELECT count(*) FROM ins) c",
        args,
    )


# Rows of blocked destinations are invisible to a tick: they neither fill its LIMIT (which
# would starve the rest of their shard) nor make a shard worth claiming. $n placeholders are
# filled in by the callers below.
_NOT_BLOCKED = """
    NOT (o.topic = ANY(${t}::text[]))
    AND NOT EXISTS (SELECT 1 FROM unnest(${bt}::text[], ${bk}::bytea[]) AS b(topic, key)
                    WHERE b.topic = o.topic AND b.key IS NOT DISTINCT FROM o.key)
"""


def _blocked_args(blocked: Blocked) -> list[Any]:
    keys = list(blocked.keys)
    return [list(blocked.topics), [t for t, _ in keys], [k for _, k in keys]]


def claim_shards(lock_base: int, start: int, limit: int, blocked: Blocked = Blocked()) -> Query:
    # Shard ownership is a transaction-scoped advisory lock: rows of one shard (hence of one
    # destination key) are published by one relay at a time, in id order, and the lock goes
    # away with the transaction however the relay dies. The CASE makes PostgreSQL test for
    # pending rows *before* trying the lock (it may otherwise reorder the quals by cost and
    # lock empty shards, keeping them from other relays for the whole tick).
    not_blocked = _NOT_BLOCKED.format(t=4, bt=5, bk=6)
    return (
        f"""
        SELECT s FROM (
            SELECT (g + $2) % {OUTBOX_SHARDS} AS s FROM generate_series(0, {OUTBOX_SHARDS - 1}) g
        ) shards
        WHERE CASE WHEN EXISTS (SELECT 1 FROM dedup.outbox o
                                WHERE o.shard = shards.s AND o.published_at IS NULL
                                  AND {not_blocked})
                   THEN pg_try_advisory_xact_lock($1, shards.s)
                   ELSE false END
        LIMIT $3
        """,
        [lock_base, start, limit, *_blocked_args(blocked)],
    )


def pending(shards: Sequence[int], limit: int, blocked: Blocked = Blocked()) -> Query:
    # Ordered by id over the claimed shards: for every shard the rows read are a prefix of its
    # pending rows, so a later row of a key is never read without the earlier ones.
    not_blocked = _NOT_BLOCKED.format(t=3, bt=4, bk=5)
    return (
        f"""
        SELECT o.id, o.topic, o.key, o.value, o.headers FROM dedup.outbox o
        WHERE o.shard = ANY($1::int[]) AND o.published_at IS NULL AND {not_blocked}
        ORDER BY o.id LIMIT $2
        """,
        [list(shards), limit, *_blocked_args(blocked)],
    )


def mark_published(ids: Sequence[int]) -> Query:
    # Runs in the tick's transaction, after the broker acknowledged every one of these ids.
    return (
        "UPDATE dedup.outbox SET published_at = now() WHERE id = ANY($1::bigint[])",
        [list(ids)],
    )


def give_up_replies(
    lock_base: int, topics: Sequence[str], older_than_s: int, reply_prefix: str, reason: str
) -> Query:
    # Replies (idempotency key ``reply:...``) to topics the cluster does not have, written
    # longer ago than the bound, leave the outbox: published_at is set (retention deletes them
    # later) and given_up says why. Only in shards no other relay holds (the try-lock, inside
    # the CASE so it is taken only for a matching row): a relay that holds a shard may be
    # publishing its rows to a topic created a moment ago.
    return (
        """
        UPDATE dedup.outbox o SET published_at = now(), given_up = $5
        WHERE o.topic = ANY($2::text[]) AND o.published_at IS NULL
          AND CASE WHEN starts_with(o.idempotency_key, $4)
                        AND o.created_at < now() - make_interval(secs => $3)
                   THEN pg_try_advisory_xact_lock($1, o.shard)
                   ELSE false END
        RETURNING o.topic
        """,
        [lock_base, list(topics), float(older_than_s), reply_prefix, reason],
    )


def pending_to(topics: Sequence[str], cap: int) -> Query:
    """Unpublished rows per topic of ``topics`` (topics the cluster does not have), each
    count stopping at ``cap``: a topic missing for days may have millions, and the figure
    is for a warning and a gauge, not worth reading them all every report."""
    return (
        """
        SELECT t.topic, (SELECT count(*) FROM (
            SELECT 1 FROM dedup.outbox o
            WHERE o.published_at IS NULL AND o.topic = t.topic LIMIT $2) capped)
        FROM unnest($1::text[]) AS t(topic)
        """,
        [list(topics), cap],
    )


def backlog() -> Query:
    # count(*) walks the partial index of pending rows. The oldest age looks at the first
    # pending row of each shard (64 index probes) rather than every pending row: with a large
    # backlog (the broker down for an hour) min(created_at) over all of them would read the
    # whole heap. created_at is its writer's transaction start, so this is the age of the
    # oldest unpublished message to within one transaction's duration.
    return (
        f"""
        SELECT
            (SELECT count(*) FROM dedup.outbox WHERE published_at IS NULL),
            COALESCE(EXTRACT(EPOCH FROM now() - (
                SELECT min(first.created_at)
                FROM generate_series(0, {OUTBOX_SHARDS - 1}) s,
                LATERAL (SELECT created_at FROM dedup.outbox o
                         WHERE o.shard = s AND o.published_at IS NULL
                         ORDER BY o.id LIMIT 1) first
            )), 0)::float8
        """,
        [],
    )


def purge_published(older_than_s: int, limit: int) -> Query:
    # One small batch through the partial index on published_at, in its own short
    # transaction. SKIP LOCKED lets every relay run retention at once without queueing behind
    # each other on the same rows. Unpublished rows are never candidates.
    return (
        """
        WITH doomed AS (
            SELECT id FROM dedup.outbox
            WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1)
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        )
        DELETE FROM dedup.outbox o USING doomed WHERE o.id = doomed.id
        """,
        [float(older_than_s), limit],
    )


def recent(topics: Sequence[str], limit: int) -> Query:
    # For `consumer conflicts`: newest rows for these topics (published or not), walking the
    # primary key backwards. Published rows live until retention purges them.
    return (
        """
        SELECT id, topic, headers, created_at, published_at FROM dedup.outbox
        WHERE topic = ANY($1::text[])
        ORDER BY id DESC LIMIT $2
        """,
        [list(topics), limit],
    )
