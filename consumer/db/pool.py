"""The asyncpg pool, with jsonb decoded to Python values."""

from __future__ import annotations

import json
import logging

import asyncpg

log = logging.getLogger(__name__)

_IDLE = "idle_in_transaction_session_timeout"


async def _init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _configured_idle_ms(dsn: str) -> int:
    """The idle-in-transaction timeout the role, database or server configuration gives a
    session of ``dsn`` (0: none), read before this pool overrides it."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT setting FROM pg_settings WHERE name = $1", _IDLE))
    finally:
        await conn.close()


async def create_pool(
    dsn: str, *, max_size: int = 8, min_size: int = 1, idle_in_tx_ms: int = 0
) -> asyncpg.Pool:
    """A pool whose connections decode jsonb. Statement cache on: queries are reused per batch.

    ``idle_in_tx_ms`` > 0 makes the server end a session that sits idle inside a transaction
    that long: a worker frozen mid-batch (SIGSTOP, a VM pause) then releases its row locks,
    so the partition's new owner is not blocked behind a zombie until it wakes up. It must
    exceed the longest handler timeout (a handler awaiting an outside call is idle in the
    transaction): a longer value set by the operator (``ALTER ROLE ... SET``) is kept, a
    shorter one is raised to ``idle_in_tx_ms`` with a warning, since it would end the session
    of every run of that handler, forever.
    """
    server_settings = {}
    if idle_in_tx_ms > 0:
        configured = await _configured_idle_ms(dsn)
        if 0 < configured < idle_in_tx_ms:
            log.warning(
                "%s is %d ms for this role/database, below the longest handler timeout: "
                "using %d ms for the consumer's sessions",
                _IDLE,
                configured,
                idle_in_tx_ms,
            )
        server_settings[_IDLE] = str(max(configured, idle_in_tx_ms))
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init,
        # asyncpg's per-call limit: never shorter than what a handler may spend on one query.
        command_timeout=max(60.0, idle_in_tx_ms / 1000),
        server_settings=server_settings,
    )
    assert pool is not None
    return pool
