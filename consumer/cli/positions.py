"""``consumer reset-positions``: set a topic's stored positions deliberately.

For example a halted partition of a re-created topic. It reads the log range of each
partition from Kafka and the group's stored positions from PostgreSQL, shows what moves and
how many records a move forward skips, asks (unless ``--yes``), then writes the new positions
in one transaction. Moving back re-reads records (deduplicated); moving forward skips them.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

import asyncpg
import typer
from rich.table import Table

from consumer.cli.common import (
    ADMIN_APP_ARG,
    LOCK_TIMEOUT,
    busy,
    connect,
    console,
    fail,
    load,
    unreachable,
)
from consumer.db import offsets
from consumer.exitcodes import RET_ABORTED, RET_CONFIG, RET_NOT_FOUND, RET_UNCONFIRMED

if TYPE_CHECKING:
    from consumer.app import App
    from consumer.settings import Settings

Ranges = dict[int, tuple[int, int]]  # partition -> (log start, high watermark)


async def _log_range(settings: Settings, topic: str) -> Ranges:
    """(log start, high watermark) of each partition of ``topic``; {} if it does not exist."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from consumer.kafka_config import client_options

    # read_uncommitted: the high watermark, the end the broker checks a fetch against.
    # client_options: TLS and SASL as the worker connects (a secured broker refuses plain).
    options = client_options(settings)
    consumer = AIOKafkaConsumer(**options, isolation_level="read_uncommitted")
    producer = AIOKafkaProducer(**options)
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
    conn = await connect(settings)
    try:
        text, args = offsets.stored(group, [(topic, p) for p in parts])
        return {r[1]: r[2] for r in await conn.fetch(text, *args)}
    finally:
        await conn.close()


async def _reset(settings: Settings, group: str, topic: str, new: dict[int, int]) -> None:
    conn = await connect(settings)
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            text, args = offsets.reset(group, topic, new)
            await conn.execute(text, *args)
    except asyncpg.LockNotAvailableError:
        busy(f"a partition of {topic!r} ({group})")
    finally:
        await conn.close()


def reset_positions(
    app_spec: str = ADMIN_APP_ARG,
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
    if [to_earliest, to_offset is not None, to_latest].count(True) != 1:
        fail("give exactly one of --to-earliest, --to-latest and --to-offset N", RET_CONFIG)
    app = load(app_spec)
    if topic not in app.topics:
        fail(f"{topic!r} is not one of this app's topics {app.topics}", RET_CONFIG)
    ranges = _ranges(app, topic, partition)
    parts = [partition] if partition is not None else sorted(ranges)
    new = _targets(ranges, parts, to_offset, to_latest)
    old = asyncio.run(_stored(app.settings, app.group, topic, parts))
    _show(app.group, topic, ranges, old, new)
    if not yes:
        if not sys.stdin.isatty():
            fail("not a terminal: give --yes to reset positions; nothing changed", RET_UNCONFIRMED)
        if not typer.confirm("Set these positions?", default=False):
            fail("positions not changed", RET_ABORTED)
    asyncio.run(_reset(app.settings, app.group, topic, new))
    console().print(f"reset {len(new)} position(s) of {app.group} on {topic}")


def _ranges(app: App, topic: str, partition: int | None) -> Ranges:
    """The log ranges of the topic's partitions; an unreachable Kafka, a missing topic or
    partition fails with one line."""
    from aiokafka.errors import KafkaError

    try:
        ranges = asyncio.run(_log_range(app.settings, topic))
    except (KafkaError, OSError) as exc:
        unreachable("Kafka", exc)
    if not ranges:
        fail(f"topic {topic!r} does not exist", RET_NOT_FOUND)
    if partition is not None and partition not in ranges:
        fail(f"{topic!r} has no partition {partition} (it has {len(ranges)})", RET_NOT_FOUND)
    return ranges


def _targets(
    ranges: Ranges, parts: list[int], to_offset: int | None, to_latest: bool
) -> dict[int, int]:
    """The new position of each partition; one outside its log fails (RET_CONFIG)."""
    new: dict[int, int] = {}
    for p in parts:
        start, end = ranges[p]
        target = to_offset if to_offset is not None else end if to_latest else start
        if not start <= target <= end:
            fail(f"offset {target} is outside partition {p}'s log ({start}..{end})", RET_CONFIG)
        new[p] = target
    return new


def _show(group: str, topic: str, ranges: Ranges, old: dict[int, int], new: dict[int, int]) -> None:
    """The table of old and new positions, then a line per partition that skips records."""
    table = Table(title=f"stored positions of {group} on {topic}")
    for column in ("partition", "old", "new", "log start", "log end", "skipped"):
        table.add_column(column, justify="right")
    skips: list[str] = []
    for p in new:
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
    out = console()
    out.print(table)
    for line in skips:  # an operator skipping records must see how many
        out.print(f"[bold red]{line}[/]" if out.is_terminal else line)
