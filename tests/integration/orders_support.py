"""Helpers of the outbox-writer and orders-HTTP tests: a database of the test, the uvicorn
server and the relay as processes of their own.

Each test gets its own database on the shared PostgreSQL server, as tests/integration/
test_relay.py does, so that no relay but the test's own publishes its rows and copy counts
are exact.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from consumer import Settings
from consumer.db.migrate import migrate_dsn
from handlers.orders.ledger import MIGRATIONS
from scripts.orders_demo.processes import free_port, healthy, relay_argv, web_argv
from scripts.toolkit import processes
from tests.conftest import app_settings

# The HTTP servers of these tests listen in this range (a machine shared by several
# sessions gives each its own range).
PORTS = os.environ.get("DEDUP_TEST_HTTP_PORTS", "25800-25899")


@contextlib.asynccontextmanager
async def own_database(
    settings: Settings, name: str, migrations: Mapping[str, Path] | None = None
) -> AsyncIterator[Settings]:
    """Settings on a fresh database ``name`` with the framework's tables and ``migrations``'
    (default: the orders example's)."""
    admin = await asyncpg.connect(settings.postgres_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = urlunsplit(urlsplit(settings.postgres_dsn)._replace(path=f"/{name}"))
    try:
        await migrate_dsn(dsn, {"orders": MIGRATIONS} if migrations is None else migrations)
        yield app_settings(settings, postgres_dsn=dsn, relay_enabled=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def environment(db: Settings, prefix: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "CONSUMER_POSTGRES_DSN": db.postgres_dsn,
        "ORDERS_TOPIC_PREFIX": prefix,
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


class Web:
    """One uvicorn process serving handlers/orders/web.py."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def web_server(env: dict[str, str], log: Path) -> AsyncIterator[Web]:
    """The server, up (``/health`` answers) on a free port of :data:`PORTS`; killed on exit."""
    first, _, last = PORTS.partition("-")
    port = free_port(int(first), int(last))
    proc = processes.spawn(web_argv(port), env, log)
    try:
        if not await healthy(f"http://127.0.0.1:{port}", 30):
            raise AssertionError(f"the orders server did not come up; see {log}")
        yield Web(proc, port, log)
    finally:
        processes.kill_tree(proc)
        processes.reap(proc)


@contextlib.asynccontextmanager
async def relay(
    env: dict[str, str], log: Path, faults: str = ""
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``consumer relay`` as its own process (``faults``: DEDUP_TEST_FAULTS, through the test
    entry point); on exit SIGTERM, then SIGKILL if it does not stop."""
    extra = {"DEDUP_TEST_FAULTS": faults} if faults else {}
    proc = processes.spawn(relay_argv(faulty=True), {**env, **extra}, log, header=True)
    try:
        yield proc
    finally:
        await processes.stop(proc, 30)


async def pending(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM dedup.outbox WHERE published_at IS NULL"))
