"""The benchmark's own PostgreSQL database: setup, reset between legs, progress and checks.

The benchmark runs in a database of its own (``<db>_bench`` on the same server, created if
absent) so that no other consumer's relay publishes the outbox rows it writes, and so that
emptying its tables between legs touches nobody else's data. Every leg is checked here (with
scripts/toolkit/audit.py): each unique key it consumed must appear exactly once in the
ledger, and once in the outbox.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from consumer.db.migrate import migrate_dsn
from scripts.toolkit.audit import audit_ledger

BENCH_SQL = """
-- One row per applied payment, for every leg (the leg's group name in ``leg``). No unique
-- constraint on purpose: a double apply must be visible, not refused by the schema.
CREATE TABLE IF NOT EXISTS bench_ledger (
    id          bigserial   PRIMARY KEY,
    leg         text        NOT NULL,
    key         text        NOT NULL,
    account     text        NOT NULL,
    cents       bigint      NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
-- The naive leg's processed-messages table, as people write it by hand.
CREATE TABLE IF NOT EXISTS bench_naive_inbox (
    leg      text        NOT NULL,
    key      text        NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (leg, key)
);
"""

RESET_SQL = """
TRUNCATE bench_ledger, bench_naive_inbox, dedup.inbox, dedup.outbox, dedup.offsets
"""


def bench_dsn(dsn: str) -> str:
    """The DSN of the benchmark's database: same server, database name + ``_bench``."""
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/") or "postgres"
    return urlunsplit(parts._replace(path=f"/{name}_bench"))


async def prepare(dsn: str) -> str:
    """Create the benchmark database if needed, migrate it, empty it; returns its DSN."""
    target = bench_dsn(dsn)
    name = urlsplit(target).path.lstrip("/")
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    await migrate_dsn(target)
    conn = await asyncpg.connect(target)
    try:
        await conn.execute(BENCH_SQL)
        await conn.execute(RESET_SQL)
    finally:
        await conn.close()
    return target


async def reset(dsn: str) -> None:
    """Empty every table a leg writes, so each leg starts from the same state."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(RESET_SQL)
    finally:
        await conn.close()


async def stored_positions(conn: asyncpg.Connection, group: str) -> dict[int, int]:
    """The framework's stored next offsets of ``group`` (its source of truth)."""
    rows = await conn.fetch(
        "SELECT partition, next_offset FROM dedup.offsets WHERE group_id = $1", group
    )
    return {r[0]: max(r[1], 0) for r in rows}


async def stored_positions_dsn(dsn: str, group: str) -> dict[int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return await stored_positions(conn, group)
    finally:
        await conn.close()


@dataclass(frozen=True, slots=True)
class Check:
    """The exactly-once check of one leg."""

    expected: int  # distinct keys the leg consumed
    rows: int  # ledger rows it wrote
    missing: int  # expected keys without a ledger row
    doubled: int  # keys with more than one ledger row
    unexpected: int  # ledger keys it never consumed
    outbox: int  # outbox rows (one publish per applied key)

    @property
    def ok(self) -> bool:
        return (
            self.missing == 0
            and self.doubled == 0
            and self.unexpected == 0
            and self.rows == self.expected
            and self.outbox == self.expected
        )

    def describe(self) -> str:
        return (
            f"expected {self.expected} keys once: ledger rows={self.rows} missing={self.missing} "
            f"doubled={self.doubled} unexpected={self.unexpected} outbox={self.outbox}"
        )


async def check(dsn: str, leg: str, expected: set[str]) -> Check:
    """Compare the ledger of ``leg`` with the keys it consumed (one row per key)."""
    conn = await asyncpg.connect(dsn)
    try:
        keys = await conn.fetch("SELECT key FROM bench_ledger WHERE leg = $1", leg)
        # The tables are emptied before each leg, so every outbox row is this leg's.
        outbox = await conn.fetchval("SELECT count(*) FROM dedup.outbox")
    finally:
        await conn.close()
    audit = audit_ledger(dict.fromkeys(expected), ((r[0], None) for r in keys))
    return Check(
        len(expected),
        audit.rows,
        len(audit.missing),
        len(audit.twice),
        len(audit.unexpected),
        outbox,
    )
