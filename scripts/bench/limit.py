"""The ``limit`` leg's writes: the competent leg's rows in one round trip per fetch.

The same rows as competent.py (processed, ledger, outbox, positions; conflicts counted, not
applied) for every partition of a fetch, in ONE statement: data-modifying CTEs, sent with
the extended protocol outside any explicit transaction, so the statement is its own
transaction (atomic: all its rows or none) and needs neither ``BEGIN`` nor ``COMMIT``.
Every CTE runs to completion whether or not the final SELECT reads it (PostgreSQL docs,
"Data-Modifying Statements in WITH"), and all of them see the same snapshot, so the ledger
and outbox rows are written for exactly the keys ``ins`` inserted. The outbox headers and
idempotency keys are built by the server. This is the floor for a consumer that writes these
rows: one round trip and one commit (one WAL flush) per fetch.
"""

from __future__ import annotations

from consumer.outbox.store import shard_of
from scripts.bench.handwritten import Books, Decoded, settled_value

APPLY = """
WITH input AS (
    SELECT * FROM unnest($3::text[], $4::bytea[], $5::text[], $6::bigint[], $7::int[],
                         $8::bigint[], $9::bytea[], $10::int[])
        AS t(key, payload_hash, account, cents, partition, "offset", value, shard)
), ins AS (
    INSERT INTO bench_processed (leg, key, payload_hash)
    SELECT $1, key, payload_hash FROM input
    ON CONFLICT DO NOTHING
    RETURNING key
), new AS (
    SELECT i.* FROM ins JOIN input i USING (key)
), ledger AS (
    INSERT INTO bench_ledger (leg, key, account, cents)
    SELECT $1, key, account, cents FROM new
), outbox AS (
    INSERT INTO dedup.outbox (topic, key, value, headers, shard, idempotency_key)
    SELECT $11, convert_to(account, 'UTF8'), value,
           jsonb_build_array(
               jsonb_build_array('content-type', 'application/msgpack'),
               jsonb_build_array('idempotency-key', $1 || ':' || key),
               jsonb_build_array('source', $2 || '/' || partition || '/' || "offset")),
           shard, $1 || ':' || key
    FROM new
), positions AS (
    INSERT INTO bench_positions (leg, topic, partition, next_offset)
    SELECT $1, $2, p, o FROM unnest($12::int[], $13::bigint[]) AS t(p, o)
    ON CONFLICT (leg, topic, partition)
    DO UPDATE SET next_offset = GREATEST(bench_positions.next_offset, EXCLUDED.next_offset)
)
SELECT
    (SELECT count(*) FROM new) AS applied,
    (SELECT count(*) FROM bench_processed p JOIN input i ON p.key = i.key
     WHERE p.leg = $1 AND p.payload_hash <> i.payload_hash) AS conflicts
"""


async def write(books: Books, batches: list[Decoded]) -> tuple[int, int]:
    """Apply a fetch in one statement; returns (keys applied, conflicts)."""
    keys: list[str] = []
    hashes: list[bytes] = []
    accounts: list[str] = []
    cents: list[int] = []
    partitions: list[int] = []
    offsets: list[int] = []
    for d in batches:
        keys += d.keys
        hashes += d.hashes
        accounts += d.accounts
        cents += d.cents
        partitions += [d.partition] * len(d.keys)
        offsets += d.offsets
    # The value and the shard need Python (msgpack, crc32); copies that turn out not to be
    # new are encoded for nothing, which costs less than a second round trip.
    values = [settled_value(k, a, c) for k, a, c in zip(keys, accounts, cents, strict=True)]
    shards = [shard_of(books.out_topic, a.encode()) for a in accounts]
    row = await books.conn.fetchrow(
        APPLY,
        books.leg,
        books.topic,
        keys,
        hashes,
        accounts,
        cents,
        partitions,
        offsets,
        values,
        shards,
        books.out_topic,
        [d.partition for d in batches],
        [d.next_offset for d in batches],
    )
    return int(row["applied"]), int(row["conflicts"]) + sum(d.conflicts for d in batches)
