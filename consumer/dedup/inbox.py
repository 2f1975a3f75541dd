"""SQL for ``dedup.inbox``: one row per (namespace, idempotency key). The fence.

Each function returns ``(text, args)`` so the queries can be read and tested as strings.
Rows are ``pending`` only inside an open transaction: the runtime turns every claimed row
into ``done`` or ``rejected``, or deletes it, before it commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from consumer.constants import HASH_ALG
from consumer.dedup.hashing import HASH_VERSION
from consumer.types import Ident, Query, RecordStatus


@dataclass(frozen=True, slots=True)
class Claim:
    namespace: str
    key: str
    hash: str
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class InboxRecord:
    namespace: str
    key: str
    hash: str
    status: RecordStatus
    result: Any
    reason: str | None
    hash_version: int  # the canonical-form version ``hash`` was made with
    # The content type of every reply to this key (consumer/runtime/replies.py); None: a
    # record completed before it was stored, answered in msgpack as it always was.
    reply_type: str | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    namespace: str
    key: str
    # "done" | "rejected". A RecordStatus once the runtime's outcome of a call is typed as
    # one (runtime/invoke.py); until then any other value is refused by the SQL's CHECK.
    status: str
    result_json: str | None
    reason: str | None
    reply_type: str | None = None  # chosen at this completion, kept for every later copy


def claim(rows: Sequence[Claim]) -> Query:
    # Claim-first: the INSERT takes the primary-key slot before the handler runs. A concurrent
    # claimer of the same key blocks on our uncommitted row until we commit (then it sees a
    # conflict and reads our record) or roll back (then it inserts). Rows are inserted in key
    # order so two batches with overlapping keys lock them in the same order (no deadlock).
    ordered = sorted(rows, key=lambda r: (r.namespace, r.key))
    return (
        """
        INSERT INTO dedup.inbox
            (namespace, key, payload_hash, hash_alg, hash_version, status,
             topic, partition, "offset")
        SELECT t.ns, t.k, t.h, $4, $8, 'pending', t.topic, t.part, t.off
        FROM unnest($1::text[], $2::text[], $3::text[], $5::text[], $6::int[], $7::bigint[])
             AS t(ns, k, h, topic, part, off)
        ORDER BY t.ns, t.k
        ON CONFLICT (namespace, key) DO NOTHING
        RETURNING namespace, key
        """,
        [
            [r.namespace for r in ordered],
            [r.key for r in ordered],
            [r.hash for r in ordered],
            HASH_ALG,
            [r.topic for r in ordered],
            [r.partition for r in ordered],
            [r.offset for r in ordered],
            HASH_VERSION,
        ],
    )


def records(idents: Sequence[Ident]) -> Query:
    return (
        """
        SELECT i.namespace, i.key, i.payload_hash, i.status, i.result, i.reason,
               i.hash_version, i.reply_type
        FROM dedup.inbox i
        JOIN unnest($1::text[], $2::text[]) AS t(ns, k) ON i.namespace = t.ns AND i.key = t.k
        """,
        [[ns for ns, _ in idents], [k for _, k in idents]],
    )


def complete(rows: Sequence[Completion]) -> Query:
    # Only rows this transaction claimed (status 'pending', locked by us) are completed.
    return (
        """
        UPDATE dedup.inbox AS i
        SET status = t.status, result = t.result::jsonb, reason = t.reason,
            reply_type = t.reply_type, completed_at = now()
        FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
             AS t(ns, k, status, result, reason, reply_type)
        WHERE i.namespace = t.ns AND i.key = t.k AND i.status = 'pending'
        """,
        [
            [r.namespace for r in rows],
            [r.key for r in rows],
            [r.status for r in rows],
            [r.result_json for r in rows],
            [r.reason for r in rows],
            [r.reply_type for r in rows],
        ],
    )


def unclaim(idents: Sequence[Ident]) -> Query:
    # Claimed but not processed (the batch stopped before them): nothing may be recorded.
    return (
        """
        DELETE FROM dedup.inbox i
        USING unnest($1::text[], $2::text[]) AS t(ns, k)
        WHERE i.namespace = t.ns AND i.key = t.k AND i.status = 'pending'
        """,
        [[ns for ns, _ in idents], [k for _, k in idents]],
    )


def get(namespace: str, key: str) -> Query:
    return (
        """
        SELECT namespace, key, payload_hash, hash_alg, hash_version, status, result, reason,
               topic, partition, "offset", first_seen_at, completed_at
        FROM dedup.inbox WHERE namespace = $1 AND key = $2
        """,
        [namespace, key],
    )


def namespaces_holding(key: str, handlers: Sequence[str], limit: int = 5) -> Query:
    """The namespaces of ``handlers`` (the bare name or ``name@<tenant>``) holding ``key``:
    what ``consumer inspect`` suggests when the namespace given has no record of it.

    The primary key leads with the namespace, and no index has the key first: the distinct
    namespaces are walked through the primary key (a loose index scan, one probe each; the
    PostgreSQL wiki's "Loose indexscan"), then each is probed for the key. The cost grows
    with the number of namespaces (handlers x tenants), never with the number of rows. A
    range on ``name@`` cannot replace the walk: non-C collations do not sort ``@`` as a byte.
    """
    return (
        """
        WITH RECURSIVE ns(n) AS (
            SELECT min(namespace) FROM dedup.inbox
            UNION ALL
            SELECT (SELECT min(namespace) FROM dedup.inbox WHERE namespace > ns.n)
            FROM ns WHERE ns.n IS NOT NULL
        )
        SELECT ns.n FROM ns
        WHERE ns.n IS NOT NULL
          AND split_part(ns.n, '@', 1) = ANY($2::text[])
          AND EXISTS (SELECT 1 FROM dedup.inbox i WHERE i.namespace = ns.n AND i.key = $1)
        LIMIT $3
        """,
        [key, list(handlers), limit],
    )


def evict(namespace: str, key: str) -> Query:
    return ("DELETE FROM dedup.inbox WHERE namespace = $1 AND key = $2", [namespace, key])


def expire(older_than_s: int, limit: int) -> Query:
    # Small batches through the first_seen_at index: short transactions, no long locks.
    # (Not completed_at: no index may cover a column the completion changes, or it would
    # not be a HOT update; a record is claimed and completed in one transaction, migration
    # 0005.) SKIP LOCKED: several relays run retention at once without queueing on the same
    # rows. Pending rows are never candidates.
    return (
        """
        DELETE FROM dedup.inbox WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM dedup.inbox
            WHERE first_seen_at < now() - make_interval(secs => $1)
              AND status <> 'pending'
            LIMIT $2
            FOR UPDATE SKIP LOCKED))
        """,
        [float(older_than_s), limit],
    )
