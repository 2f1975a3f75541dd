"""``consumer replay``: send dead letters back to their topic (consumer/replay.py does it).

This module checks the arguments, shows progress and prints the summary table; it never
decides what is replayed.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from consumer.cli.common import ADMIN_APP_ARG, console, fail, load, unreachable
from consumer.constants import DLQ_SUFFIX
from consumer.exitcodes import RET_CONFIG, RET_NOT_FOUND

if TYPE_CHECKING:
    from consumer.app import App
    from consumer.replay import ReplaySummary

SHOWN_UNDECODABLE = 20  # lines listed before "... and N more"


def replay(
    app_spec: str = ADMIN_APP_ARG,
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
    app = load(app_spec)
    if not dlq_topic.endswith(DLQ_SUFFIX) or dlq_topic.removesuffix(DLQ_SUFFIX) not in app.topics:
        fail(f"{dlq_topic!r} is not the dead-letter topic of one of {app.topics}", RET_CONFIG)
    summary = _run(app, dlq_topic, reason, limit, dry_run, force)
    _print(summary, dlq_topic, "would replay" if dry_run else "replayed")


def _run(
    app: App, dlq_topic: str, reason: list[str], limit: int | None, dry_run: bool, force: bool
) -> ReplaySummary:
    """Replay with a progress bar on stderr; a missing topic or an unreachable Kafka fails."""
    from aiokafka.errors import KafkaError
    from rich.progress import Progress

    from consumer.replay import TopicMissing
    from consumer.replay import replay as run_replay

    try:
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"reading {dlq_topic}", total=None)
            return asyncio.run(
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
        unreachable("Kafka", exc)


def _print(summary: ReplaySummary, dlq_topic: str, verb: str) -> None:
    table = Table(title=f"{dlq_topic}: {summary.read} dead letters read ({summary.group})")
    for column in ("x-reason", verb, "expired (not replayed)", "other reason (skipped)"):
        table.add_column(column, justify="left" if column == "x-reason" else "right")
    for r in sorted(set(summary.replayed) | set(summary.skipped) | set(summary.expired)):
        table.add_row(r, str(summary.replayed[r]), str(summary.expired[r]), str(summary.skipped[r]))
    out = console()
    out.print(table)
    for topic, n in sorted(summary.targets.items()):
        out.print(f"{verb} {n} to {topic}")
    if summary.undecodable:
        out.print(
            f"undecodable (skipped): {len(summary.undecodable)} record(s) the Kafka client "
            "cannot parse, not dead letters this app can read:"
        )
        for line in summary.undecodable[:SHOWN_UNDECODABLE]:
            out.print(f"  {line}", markup=False, highlight=False)
        if len(summary.undecodable) > SHOWN_UNDECODABLE:
            out.print(f"  ... and {len(summary.undecodable) - SHOWN_UNDECODABLE} more")
    if summary.expired:
        out.print(
            "expired: older than 90% of CONSUMER_DEDUP_WINDOW_S, their keys' records may be "
            "gone (a key applied meanwhile would apply again); --force replays them anyway"
        )
