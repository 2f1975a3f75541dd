"""The asyncpg pool, with jsonb decoded to Python values."""

from __future__ import annotations

import json

import asyncpg


async def _init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(
    dsn: str, *, max_size: int = 8, min_size: int = 1, idle_in_tx_ms: int = 0
) -> asyncpg.Pool:
    """A pool whose connections decode jsonb. Statement cache on: queries are reused per batch.

    ``idle_in_tx_ms`` > 0 makes the server end a session that sits idle inside a transaction
    that long: a worker frozen mid-batch (SIGSTOP, a VM pause) then releases its row locks,
    so the partition's new owner is not blocked behind a zombie until it wakes up.
    """
    server_settings = {}
    if idle_in_tx_ms > 0:
        server_settings["idle_in_transaction_session_timeout"] = str(idle_in_tx_ms)
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init,
        command_timeout=60,
        server_settings=server_settings,
    )
    assert pool is not None
    return pool
