"""``consumer inspect`` and ``evict``: the dedup record of one key, shown or forgotten.

They read (and, for ``evict``, delete) one app's inbox record and the accelerator's state of
the key, and print rich tables. They never run a handler and never publish. Evicting makes
the framework forget a key: the next message with it runs the handler again, so it asks for
confirmation unless ``--yes``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any

import asyncpg
import typer
from rich.table import Table

from consumer.cli.common import ADMIN_APP_ARG, LOCK_TIMEOUT, busy, connect, console, fail, load
from consumer.constants import done_key, lease_key
from consumer.dedup import inbox
from consumer.exitcodes import RET_ABORTED, RET_NOT_FOUND, RET_UNCONFIRMED
from consumer.message import location

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


def _record(row: asyncpg.Record, redis_state: dict[str, str]) -> dict[str, Any]:
    """The record of a key in its JSON form (the table shows the same fields)."""
    result = row["result"]
    return {
        "namespace": row["namespace"],
        "key": row["key"],
        "status": row["status"],
        "payload_hash": row["payload_hash"],
        "hash_alg": row["hash_alg"],
        "hash_version": row["hash_version"],
        # The admin connection has no jsonb codec: the value arrives as its JSON text.
        "result": json.loads(result) if isinstance(result, str) else result,
        "reason": row["reason"],
        "first_seen_at": row["first_seen_at"].isoformat(),
        "completed_at": row["completed_at"].isoformat() if row["completed_at"] else None,
        "first_seen_in": location(row["topic"], row["partition"], row["offset"]),
        "redis": redis_state,
    }


def _record_table(rec: dict[str, Any]) -> Table:
    table = Table(title=f"{rec['namespace']} / {rec['key']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    result = rec["result"]
    for name, value in [
        ("status", rec["status"]),
        (
            "payload hash",
            f"{rec['payload_hash']} ({rec['hash_alg']}, canonical form v{rec['hash_version']})",
        ),
        ("result", None if result is None else json.dumps(result)),
        ("reason", rec["reason"]),
        ("first seen at", rec["first_seen_at"]),
        ("completed at", rec["completed_at"]),
        ("first seen in", rec["first_seen_in"]),
        *rec["redis"].items(),
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


async def _holding(settings: Settings, key: str, handlers: list[str]) -> list[str]:
    """The namespaces of ``handlers`` (with or without a tenant) that hold ``key``."""
    conn = await connect(settings)
    try:
        text, args = inbox.namespaces_holding(key, handlers)
        return [str(r[0]) for r in await conn.fetch(text, *args)]
    finally:
        await conn.close()


def _not_found(app: App, namespace: str, key: str) -> str:
    """The one line of a key with no record under ``namespace``: the app's namespaces when
    the one given is not among them, and the namespaces that do hold the key (a tenant's
    ``name@tenant``, or the bare name when a tenant was given)."""
    names = sorted(h.name for h in app.handlers)
    base = namespace.partition("@")[0]
    line = f"no record for namespace {namespace!r}, key {key!r}"
    if base not in names:
        line += f"; this app's namespaces: {', '.join(names) or 'none'}"
    found = asyncio.run(_holding(app.settings, key, sorted({base, *names})))
    holding = [ns for ns in found if ns != namespace]
    if holding:
        line += f"; key {key!r} is stored under: {', '.join(holding)}"
    return line


def _found(app: App, namespace: str, key: str) -> tuple[asyncpg.Record, str]:
    """The record of a key and the epoch, or one line (with hints) and RET_NOT_FOUND."""
    row, epoch = asyncio.run(_fetch(app.settings, namespace, key))
    if row is None:
        fail(_not_found(app, namespace, key), RET_NOT_FOUND)
    return row, epoch


def inspect(
    app_spec: str = ADMIN_APP_ARG,
    namespace: str = NS_ARG,
    key: str = KEY_ARG,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
) -> None:
    """Show the record of one key: status, payload hash, result, first seen at."""
    app = load(app_spec)
    row, epoch = _found(app, namespace, key)
    redis_state = asyncio.run(_redis_state(app.settings, namespace, key, epoch))
    rec = _record(row, redis_state)
    if as_json:
        typer.echo(json.dumps(rec))
        return
    console().print(_record_table(rec))


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


def _confirmed() -> bool:
    """The answer to the eviction question; no answer at all on a stdin that is not a
    terminal (a script, a pipe, CI) ends in one line naming --yes and RET_UNCONFIRMED,
    where click would abort with 130 as for Ctrl-C."""
    try:
        return typer.confirm(
            "Evict this record? The next message with this key will run the handler again",
            default=False,
        )
    except typer.Abort:
        if sys.stdin.isatty():
            raise  # Ctrl-C or Ctrl-D at the prompt: 130, as for any interrupted command
        fail("not a terminal and no answer: give --yes to evict; nothing changed", RET_UNCONFIRMED)


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
    out.print(_record_table(_record(row, {})))
    if not yes and not _confirmed():
        fail("not evicted; nothing changed", RET_ABORTED)
    deleted = asyncio.run(evict_record(app.settings, namespace, key, epoch))
    if deleted == 0:  # deleted by someone else (or expired) since it was shown
        fail(f"no record for namespace {namespace!r}, key {key!r} any more", RET_NOT_FOUND)
    out.print(f"evicted {namespace} / {key}")
