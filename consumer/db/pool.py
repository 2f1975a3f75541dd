"""The asyncpg pool, with jsonb decoded to Python values."""

from __future__ import annotations

import json

import asyncpg


async def _init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: str, *, max_size: int = 8, min_size: int = 1) -> asyncpg.Pool:
    """A pool whose connections decode jsonb. Statement cache on: queries are reused per batch."""
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init, command_timeout=60
    )
    assert pool is not None
    return pool
