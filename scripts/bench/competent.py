"""The ``competent`` leg's writes: per partition batch ONE transaction, a statement per kind.

What a strong engineer writes by hand in a day (the loop, decoding and books are in
handwritten.py): for each partition of a fetch, ``BEGIN``; one
``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING RETURNING`` into the processed
table, which also counts the conflicts (a stored key with another hash); the ledger rows of
the new keys in one statement; their outbox rows in one statement; the position; ``COMMIT``.
Six round trips per partition batch, none per message.
"""

from __future__ import annotations

from consumer.outbox.store import shard_of
from scripts.bench.handwritten import (
    POSITION_UPSERT,
    Books,
    Decoded,
    headers_json,
    settled_value,
)

# The rows the statement's snapshot sees are the keys processed before it: those stored with
# another hash are conflicts. RETURNING gives the keys this statement inserted (the new ones).
CLAIM = """
WITH input AS (
    SELECT * FROM unnest($2::text[], $3::bytea[]) AS t(key, payload_hash)
), ins AS (
    INSERT INTO bench_processed (leg, key, payload_hash)
    SELECT $1, key, payload_hash FROM input
    ON CONFLICT DO NOTHING
    RETURNING key
)
SELECT
    (SELECT array_agg(key) FROM ins) AS new_keys,
    (SELECT count(*) FROM bench_processed p JOIN input i ON p.key = i.key
     WHERE p.leg = $1 AND p.payload_hash <> i.payload_hash) AS conflicts
"""

# benchapp.LEDGER_INSERT's row, for many keys at once.
LEDGER_MANY = """
INSERT INTO bench_ledger (leg, key, account, cents)
SELECT $1, k, a, c FROM unnest($2::text[], $3::text[], $4::bigint[]) AS t(k, a, c)
"""

OUTBOX_MANY = """
INSERT INTO dedup.outbox (topic, key, value, headers, shard, idempotency_key)
SELECT $1, k, v, h::jsonb, s, ik
FROM unnest($2::bytea[], $3::bytea[], $4::text[], $5::int[], $6::text[]) AS t(k, v, h, s, ik)
"""


async def _partition(books: Books, d: Decoded) -> tuple[int, int]:
    conn, leg = books.conn, books.leg
    async with conn.transaction():
        row = await conn.fetchrow(CLAIM, leg, d.keys, d.hashes)
        new = set(row["new_keys"] or ())
        if new:
            idx = [i for i, k in enumerate(d.keys) if k in new]
            keys = [d.keys[i] for i in idx]
            accounts = [d.accounts[i] for i in idx]
            cents = [d.cents[i] for i in idx]
            await conn.execute(LEDGER_MANY, leg, keys, accounts, cents)
            okeys = [a.encode() for a in accounts]
            await conn.execute(
                OUTBOX_MANY,
                books.out_topic,
                okeys,
                [settled_value(*t) for t in zip(keys, accounts, cents, strict=True)],
                [headers_json(leg, k, books.topic, d.partition, d.offsets[i])
                 for k, i in zip(keys, idx, strict=True)],
                [shard_of(books.out_topic, k) for k in okeys],
                [f"{leg}:{k}" for k in keys],
            )  # fmt: skip
        await conn.execute(POSITION_UPSERT, leg, books.topic, [d.partition], [d.next_offset])
    return len(new), int(row["conflicts"]) + d.conflicts


async def write(books: Books, batches: list[Decoded]) -> tuple[int, int]:
    """Apply a fetch, one transaction per partition; returns (keys applied, conflicts)."""
    applied = conflicts = 0
    for d in batches:
        new, bad = await _partition(books, d)
        applied, conflicts = applied + new, conflicts + bad
    return applied, conflicts
