"""``consumer inspect`` and ``evict``: the dedup record of one key, shown or forgotten.

They read (and, for ``evict``, delete) one app's inbox record and the accelerator's state of
the key, and print rich tables. They never run a handler and never publish. Evicting makes
the framework forget a key: the next message with it runs the handler again, so it asks for
confirmation unless ``--yes``.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import asyncpg
import typer
from rich.table import Table

from consumer.cli.common import ADMIN_APP_ARG, LOCK_TIMEOUT, busy, connect, console, fail, load
from consumer.constants import done_key, lease_key
from consumer.dedup import inbox
from consumer.exitcodes import RET_ABORTED, RET_NOT_FOUND

if TYPE_CHECKING:
    from consumer.app import App
    from consumer.settings import Settings

NS_ARG = typer.Argument(..., help="handler namespace, e.g. payments.settle (or name@tenant)")
KEY_ARG = typer.Argument(..., help="the idempotency key")


async def _epoch(conn: asyncpg.Connection) -> str:
    # Done markers carry the database's epoch (see constants.done_key).
    value = await conn.fetchval("SELECT value FROM dedup.meta WHERE name = 'epoch'")
    return str(value or "")


async def _redis_state(settings: Settings, namespace: str, key: str, epoch: str) -> dict[str, str]:
    """What the accelerator says about a key; Redis being down is reported, not fatal."""
    if settings.redis_mode == "off":
        return {"redis": "off (CONSUMER_REDIS_MODE=off)"}
    from consumer.dedup.cluster import redis_client

    client = redis_client(settings.redis_url, settings.redis_cluster)
    try:
        done = await client.get(done_key(namespace, key, epoch))
        lease = await client.get(lease_key(namespace, key))
        lease_ms = await client.pttl(lease_key(namespace, key)) if lease else -2
    except Exception as exc:
        return {"redis": f"unreachable ({type(exc).__name__}: {exc})"}
    finally:
        await client.aclose()
    return {
        "done marker": _text(done) if done else "none",
        "lease": f"held by {_text(lease)} ({lease_ms} ms left)" if lease else "free",
    }


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _record_table(row: asyncpg.Record, redis_state: dict[str, str]) -> Table:
    table = Table(title=f"{row['namespace']} / {row['key']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    result = row["result"]
    for name, value in [
        ("status", row["status"]),
        (
            "payload hash",
            f"{row['payload_hash']} ({row['hash_alg']}, canonical form v{row['hash_version']})",
        ),
        ("result", result if result is None or isinstance(result, str) else json.dumps(result)),
        ("reason", row["reason"]),
        ("first seen at", row["first_seen_at"].isoformat()),
        ("completed at", row["completed_at"].isoformat() if row["completed_at"] else None),
        ("first seen in", f"{row['topic']}/{row['partition']}@{row['offset']}"),
        *redis_state.items(),
    ]:
        table.add_row(name, "-" if value is None else str(value))
    return table


async def _fetch(settings: Settings, namespace: str, key: str) -> tuple[asyncpg.Record | None, str]:
    """The inbox record of a key (None if there is none), and the database's epoch."""
    conn = await connect(settings)
    try:
        text, args = inbox.get(namespace, key)
        row: asyncpg.Record | None = await conn.fetchrow(text, *args)
        return row, await _epoch(conn)
    finally:
        await conn.close()


def _found(app: App, namespace: str, key: str) -> tuple[asyncpg.Record, str]:
    """The record of a key and the epoch, or one line naming the app's namespaces and
    RET_NOT_FOUND."""
    row, epoch = asyncio.run(_fetch(app.settings, namespace, key))
    if row is None:
        names = sorted(h.name for h in app.handlers)
        base = namespace.partition("@")[0]
        hint = "" if base in names else f"; this app's namespaces: {', '.join(names) or 'none'}"
        fail(f"no record for namespace {namespace!r}, key {key!r}{hint}", RET_NOT_FOUND)
    return row, epoch


def inspect(app_spec: str = ADMIN_APP_ARG, namespace: str = NS_ARG, key: str = KEY_ARG) -> None:
    """Show the record of one key: status, payload hash, result, first seen at."""
    app = load(app_spec)
    row, epoch = _found(app, namespace, key)
    redis_state = asyncio.run(_redis_state(app.settings, namespace, key, epoch))
    console().print(_record_table(row, redis_state))


async def evict_record(settings: Settings, namespace: str, key: str, epoch: str) -> int:
    """Delete the inbox record of a key, then its done marker and lease; records deleted."""
    conn = await connect(settings)
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            text, args = inbox.evict(namespace, key)
            status = await conn.execute(text, *args)
    except asyncpg.LockNotAvailableError:
        busy(f"the record of {namespace!r} / {key!r}")
    finally:
        await conn.close()
    deleted = int(status.split()[-1])
    # After the database: a worker reading the record before the DELETE may still write a
    # done marker, which this removes. Redis is only the accelerator, so it goes second.
    if settings.redis_mode != "off":
        from consumer.dedup.cluster import redis_client

        client = redis_client(settings.redis_url, settings.redis_cluster)
        try:
            await client.delete(done_key(namespace, key, epoch), lease_key(namespace, key))
        finally:
            await client.aclose()
    return deleted


def evict(
    app_spec: str = ADMIN_APP_ARG,
    namespace: str = NS_ARG,
    key: str = KEY_ARG,
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
) -> None:
    """Forget one key (inbox record, done marker, lease): its next message runs the handler."""
    app = load(app_spec)
    row, epoch = _found(app, namespace, key)
    out = console()
    out.print(_record_table(row, {}))
    if not yes and not typer.confirm(
        "Evict this record? The next message with this key will run the handler again",
        default=False,
    ):
        fail("not evicted; nothing changed", RET_ABORTED)
    deleted = asyncio.run(evict_record(app.settings, namespace, key, epoch))
    if deleted == 0:  # deleted by someone else (or expired) since it was shown
        fail(f"no record for namespace {namespace!r}, key {key!r} any more", RET_NOT_FOUND)
    out.print(f"evicted {namespace} / {key}")
