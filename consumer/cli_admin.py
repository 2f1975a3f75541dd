"""Operator commands: ``consumer inspect``, ``evict``, ``conflicts``, ``replay`` and
``reset-positions``.

They read (and, for ``evict``, delete) one app's dedup records and print rich tables. They
never run a handler and never publish. Evicting makes the framework forget a key: the next
message with it runs the handler again, so it asks for confirmation unless ``--yes``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from consumer.constants import (
    CONFLICT_SUFFIX,
    DLQ_SUFFIX,
    HEADER_HASH,
    HEADER_KEY,
    HEADER_NAMESPACE,
    HEADER_SOURCE,
    HEADER_STORED_HASH,
    done_key,
    lease_key,
)
from consumer.db import offsets
from consumer.dedup import inbox
from consumer.exitcodes import (
    RET_ABORTED,
    RET_BUSY,
    RET_CONFIG,
    RET_CONNECT,
    RET_NOT_FOUND,
    RET_UNCONFIRMED,
)
from consumer.outbox import store

if TYPE_CHECKING:
    from consumer.app import App
    from consumer.settings import Settings

APP_ARG = typer.Argument(..., metavar="MODULE:APP", help="the App, e.g. handlers.app:app")
NS_ARG = typer.Argument(..., help="handler namespace, e.g. payments.settle (or name@tenant)")
KEY_ARG = typer.Argument(..., help="the idempotency key")


def _console() -> Console:
    # Piped into a file or grep, lines stay whole (hashes and keys unbroken).
    probe = Console()
    return probe if probe.is_terminal else Console(width=200)


async def _connect(settings: Settings) -> asyncpg.Connection:
    from consumer.cli import fail

    try:
        return await asyncpg.connect(settings.postgres_dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        fail(f"cannot reach PostgreSQL: {type(exc).__name__}: {exc}", RET_CONNECT)


# A worker's batch holds the rows it writes (inbox, offsets) until it commits: milliseconds.
# Waiting longer than this means something is stuck, and the operator should know.
LOCK_TIMEOUT = "5s"


def _busy(what: str) -> NoReturn:
    from consumer.cli import fail

    fail(
        f"{what} is busy: a running batch held its row for over {LOCK_TIMEOUT} "
        "(lock timeout); nothing changed, retry",
        RET_BUSY,
    )


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


def _not_found(app: App, namespace: str, key: str) -> None:
    from consumer.cli import fail

    names = sorted(h.name for h in app.handlers)
    base = namespace.partition("@")[0]
    hint = "" if base in names else f"; this app's namespaces: {', '.join(names) or 'none'}"
    fail(f"no record for namespace {namespace!r}, key {key!r}{hint}", RET_NOT_FOUND)


async def _fetch(settings: Settings, namespace: str, key: str) -> tuple[asyncpg.Record | None, str]:
    """The inbox record of a key (None if there is none), and the database's epoch."""
    conn = await _connect(settings)
    try:
        text, args = inbox.get(namespace, key)
        row: asyncpg.Record | None = await conn.fetchrow(text, *args)
        return row, await _epoch(conn)
    finally:
        await conn.close()


def inspect(app_spec: str = APP_ARG, namespace: str = NS_ARG, key: str = KEY_ARG) -> None:
    """Show the record of one key: status, payload hash, result, first seen at."""
    from consumer.cli import load

    app = load(app_spec)
    row, epoch = asyncio.run(_fetch(app.settings, namespace, key))
    if row is None:
        _not_found(app, namespace, key)
    assert row is not None
    redis_state = asyncio.run(_redis_state(app.settings, namespace, key, epoch))
    _console().print(_record_table(row, redis_state))


async def _evict(settings: Settings, namespace: str, key: str, epoch: str) -> int:
    conn = await _connect(settings)
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            text, args = inbox.evict(namespace, key)
            status = await conn.execute(text, *args)
    except asyncpg.LockNotAvailableError:
        _busy(f"the record of {namespace!r} / {key!r}")
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
    app_spec: str = APP_ARG,
    namespace: str = NS_ARG,
    key: str = KEY_ARG,
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
) -> None:
    """Forget one key (inbox record, done marker, lease): its next message runs the handler."""
    from consumer.cli import fail, load

    app = load(app_spec)
    row, epoch = asyncio.run(_fetch(app.settings, namespace, key))
    if row is None:
        _not_found(app, namespace, key)
    assert row is not None
    console = _console()
    console.print(_record_table(row, {}))
    if not yes and not typer.confirm(
        "Evict this record? The next message with this key will run the handler again",
        default=False,
    ):
        fail("not evicted; nothing changed", RET_ABORTED)
    deleted = asyncio.run(_evict(app.settings, namespace, key, epoch))
    if deleted == 0:  # deleted by someone else (or expired) since it was shown
        fail(f"no record for namespace {namespace!r}, key {key!r} any more", RET_NOT_FOUND)
    console.print(f"evicted {namespace} / {key}")


async def _conflicts(settings: Settings, topics: Sequence[str], limit: int) -> list[Any]:
    conn = await _connect(settings)
    try:
        text, args = store.recent(topics, limit)
        return list(await conn.fetch(text, *args))
    finally:
        await conn.close()


def _headers(raw: Any) -> dict[str, str]:
    pairs = json.loads(raw) if isinstance(raw, str) else raw
    return {str(name): str(value) for name, value in pairs}


def conflicts(
    app_spec: str = APP_ARG,
    limit: int = typer.Option(20, "--limit", "-n", min=1, max=10_000, help="rows to show"),
) -> None:
    """List the most recent conflicts (a key reused with a different payload), newest first.

    Read from the outbox, so only conflicts within the outbox retention window are shown.
    """
    from consumer.cli import load

    app = load(app_spec)
    topics = [t + CONFLICT_SUFFIX for t in app.topics]
    rows = asyncio.run(_conflicts(app.settings, topics, limit))
    table = Table(title=f"recent conflicts of {app.group} ({len(rows)})")
    for column in ("at (UTC)", "namespace", "key", "payload hash", "stored hash", "source", "sent"):
        table.add_column(column, overflow="fold")
    for row in rows:
        h = _headers(row["headers"])
        table.add_row(
            row["created_at"].strftime("%Y-%m-%d %H:%M:%S"),
            h.get(HEADER_NAMESPACE, "-"),
            h.get(HEADER_KEY, "-"),
            h.get(HEADER_HASH, "-"),
            h.get(HEADER_STORED_HASH, "-"),
            h.get(HEADER_SOURCE, "-"),
            "yes" if row["published_at"] else "pending",
        )
    _console().print(table)


def replay(
    app_spec: str = APP_ARG,
    dlq_topic: str = typer.Argument(
        ..., metavar="TOPIC.dlq", help="the dead-letter topic, e.g. payments.requested.dlq"
    ),
    reason: list[str] = typer.Option(
        ["failed"], "--reason", "-r", help="x-reason values to replay (repeatable)"
    ),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="replay at most N"),
    dry_run: bool = typer.Option(False, "--dry-run", help="count, send nothing, keep position"),
    force: bool = typer.Option(
        False, "--force", help="also replay dead letters older than 90% of the dedup window"
    ),
) -> None:
    """Send dead letters back to their topic (default: those that `failed` transiently).

    Safe to repeat within the dedup window: every copy is deduplicated like any message. Each
    reason set keeps its own read position, so a second run replays only newer dead letters.
    """
    from aiokafka.errors import KafkaError
    from rich.progress import Progress

    from consumer.cli import fail, load
    from consumer.replay import TopicMissing
    from consumer.replay import replay as run_replay

    app = load(app_spec)
    if not dlq_topic.endswith(DLQ_SUFFIX) or dlq_topic.removesuffix(DLQ_SUFFIX) not in app.topics:
        fail(f"{dlq_topic!r} is not the dead-letter topic of one of {app.topics}", RET_CONFIG)
    try:
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"reading {dlq_topic}", total=None)
            summary = asyncio.run(
                run_replay(
                    app,
                    app.settings,
                    dlq_topic,
                    reason,
                    limit=limit,
                    dry_run=dry_run,
                    force=force,
                    progress=lambda read, total: bar.update(task, completed=read, total=total),
                )
            )
    except TopicMissing as exc:
        fail(str(exc), RET_NOT_FOUND)
    except (KafkaError, OSError) as exc:
        fail(f"cannot reach Kafka: {type(exc).__name__}: {exc}", RET_CONNECT)
    verb = "would replay" if dry_run else "replayed"
    table = Table(title=f"{dlq_topic}: {summary.read} dead letters read ({summary.group})")
    for column in ("x-reason", verb, "expired (not replayed)", "other reason (skipped)"):
        table.add_column(column, justify="left" if column == "x-reason" else "right")
    for r in sorted(set(summary.replayed) | set(summary.skipped) | set(summary.expired)):
        table.add_row(r, str(summary.replayed[r]), str(summary.expired[r]), str(summary.skipped[r]))
    console = _console()
    console.print(table)
    for topic, n in sorted(summary.targets.items()):
        console.print(f"{verb} {n} to {topic}")
    if summary.undecodable:
        console.print(
            f"undecodable (skipped): {len(summary.undecodable)} record(s) the Kafka client "
            "cannot parse, not dead letters this app can read:"
        )
        for line in summary.undecodable[:20]:
            console.print(f"  {line}", markup=False, highlight=False)
        if len(summary.undecodable) > 20:
            console.print(f"  ... and {len(summary.undecodable) - 20} more")
    if summary.expired:
        console.print(
            "expired: older than 90% of CONSUMER_DEDUP_WINDOW_S, their keys' records may be "
            "gone (a key applied meanwhile would apply again); --force replays them anyway"
        )


async def _log_range(settings: Settings, topic: str) -> dict[int, tuple[int, int]]:
    """(log start, high watermark) of each partition of ``topic``; {} if it does not exist."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    # read_uncommitted: the high watermark, the end the broker checks a fetch against.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, isolation_level="read_uncommitted"
    )
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        await producer.start()
        # Checked first: asking the producer for a missing topic could create it.
        if topic not in await consumer.topics():
            return {}
        tps = [TopicPartition(topic, p) for p in sorted(await producer.partitions_for(topic))]
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        return {tp.partition: (starts[tp], ends[tp]) for tp in tps}
    finally:
        await producer.stop()
        await consumer.stop()


async def _stored(settings: Settings, group: str, topic: str, parts: list[int]) -> dict[int, int]:
    conn = await _connect(settings)
    try:
        text, args = offsets.stored(group, [(topic, p) for p in parts])
        return {r[1]: r[2] for r in await conn.fetch(text, *args)}
    finally:
        await conn.close()


async def _reset(settings: Settings, group: str, topic: str, new: dict[int, int]) -> None:
    conn = await _connect(settings)
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            text, args = offsets.reset(group, topic, new)
            await conn.execute(text, *args)
    except asyncpg.LockNotAvailableError:
        _busy(f"a partition of {topic!r} ({group})")
    finally:
        await conn.close()


def reset_positions(
    app_spec: str = APP_ARG,
    topic: str = typer.Option(..., "--topic", help="one of the app's topics"),
    partition: int | None = typer.Option(None, "--partition", min=0, help="default: all"),
    to_earliest: bool = typer.Option(False, "--to-earliest", help="the log start offset"),
    to_offset: int | None = typer.Option(None, "--to-offset", min=0, help="this offset"),
    to_latest: bool = typer.Option(
        False, "--to-latest", help="the log end: skip everything there now (a new group)"
    ),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
) -> None:
    """Set the stored positions of a topic's partitions deliberately (e.g. a halted partition
    of a re-created topic). Moving back re-reads records (deduplicated); moving forward skips
    them. A running worker picks up the new position of a HALTED partition within seconds,
    of any other partition at its next batch."""
    from aiokafka.errors import KafkaError

    from consumer.cli import fail, load

    if [to_earliest, to_offset is not None, to_latest].count(True) != 1:
        fail("give exactly one of --to-earliest, --to-latest and --to-offset N", RET_CONFIG)
    app = load(app_spec)
    if topic not in app.topics:
        fail(f"{topic!r} is not one of this app's topics {app.topics}", RET_CONFIG)
    try:
        ranges = asyncio.run(_log_range(app.settings, topic))
    except (KafkaError, OSError) as exc:
        fail(f"cannot reach Kafka: {type(exc).__name__}: {exc}", RET_CONNECT)
    if not ranges:
        fail(f"topic {topic!r} does not exist", RET_NOT_FOUND)
    if partition is not None and partition not in ranges:
        fail(f"{topic!r} has no partition {partition} (it has {len(ranges)})", RET_NOT_FOUND)
    parts = [partition] if partition is not None else sorted(ranges)
    new: dict[int, int] = {}
    for p in parts:
        start, end = ranges[p]
        target = to_offset if to_offset is not None else end if to_latest else start
        if not start <= target <= end:
            fail(f"offset {target} is outside partition {p}'s log ({start}..{end})", RET_CONFIG)
        new[p] = target
    old = asyncio.run(_stored(app.settings, app.group, topic, parts))
    table = Table(title=f"stored positions of {app.group} on {topic}")
    for column in ("partition", "old", "new", "log start", "log end", "skipped"):
        table.add_column(column, justify="right")
    skips: list[str] = []
    for p in parts:
        was = old.get(p)
        start, end = ranges[p]
        # Records in the log from where the group would read (its position, or the log
        # start for a position the log does not have) up to the new position: never read.
        base = was if was is not None and start <= was <= end else start
        skipped = max(0, new[p] - base)
        if skipped:
            last = new[p] - 1
            skips.append(f"partition {p}: {skipped} record(s) skipped (offsets {base}..{last})")
        table.add_row(
            str(p),
            "-" if was is None else str(was),
            str(new[p]),
            *map(str, ranges[p]),
            str(skipped),
        )
    console = _console()
    console.print(table)
    for line in skips:  # an operator skipping records must see how many
        console.print(f"[bold red]{line}[/]" if console.is_terminal else line)
    if not yes:
        if not sys.stdin.isatty():
            fail("not a terminal: give --yes to reset positions; nothing changed", RET_UNCONFIRMED)
        if not typer.confirm("Set these positions?", default=False):
            fail("positions not changed", RET_ABORTED)
    asyncio.run(_reset(app.settings, app.group, topic, new))
    console.print(f"reset {len(new)} position(s) of {app.group} on {topic}")


def register(cli: typer.Typer) -> None:
    """Add the operator commands to the ``consumer`` command."""
    cli.command("inspect")(inspect)
    cli.command("evict")(evict)
    cli.command("conflicts")(conflicts)
    cli.command("replay")(replay)
    cli.command("reset-positions")(reset_positions)
