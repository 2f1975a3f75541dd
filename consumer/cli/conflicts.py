"""``consumer conflicts``: the most recent conflicts (a key reused with another payload).

Read from the outbox, where each conflict report waits to be (or was) published to the
``.conflicts`` topic; so only conflicts within the outbox retention window are shown. It
never writes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from consumer.cli.common import ADMIN_APP_ARG, connect, console, load
from consumer.constants import (
    CONFLICT_SUFFIX,
    HEADER_HASH,
    HEADER_KEY,
    HEADER_NAMESPACE,
    HEADER_SOURCE,
    HEADER_STORED_HASH,
)
from consumer.outbox import store

if TYPE_CHECKING:
    from consumer.settings import Settings


async def _recent(settings: Settings, topics: Sequence[str], limit: int) -> list[Any]:
    conn = await connect(settings)
    try:
        text, args = store.recent(topics, limit)
        return list(await conn.fetch(text, *args))
    finally:
        await conn.close()


def _headers(raw: Any) -> dict[str, str]:
    pairs = json.loads(raw) if isinstance(raw, str) else raw
    return {str(name): str(value) for name, value in pairs}


def conflicts(
    app_spec: str = ADMIN_APP_ARG,
    limit: int = typer.Option(20, "--limit", "-n", min=1, max=10_000, help="rows to show"),
    as_json: bool = typer.Option(False, "--json", help="print JSON rows instead of a table"),
) -> None:
    """List the most recent conflicts (a key reused with a different payload), newest first.

    Read from the outbox, so only conflicts within the outbox retention window are shown.
    """
    app = load(app_spec)
    topics = [t + CONFLICT_SUFFIX for t in app.topics]
    rows = asyncio.run(_recent(app.settings, topics, limit))
    found = [_row(row) for row in rows]
    if as_json:
        typer.echo(json.dumps(found))
        return
    table = Table(title=f"recent conflicts of {app.group} ({len(rows)})")
    for column in ("at (UTC)", "namespace", "key", "payload hash", "stored hash", "source", "sent"):
        table.add_column(column, overflow="fold")
    for r in found:
        table.add_row(
            r["at"][:19].replace("T", " "),
            *(r[c] or "-" for c in ("namespace", "key", "payload_hash", "stored_hash", "source")),
            "yes" if r["sent"] else "pending",
        )
    console().print(table)


def _row(row: Any) -> dict[str, Any]:
    """One conflict in its JSON form (the table shows the same fields)."""
    h = _headers(row["headers"])
    return {
        "at": row["created_at"].isoformat(),
        "namespace": h.get(HEADER_NAMESPACE),
        "key": h.get(HEADER_KEY),
        "payload_hash": h.get(HEADER_HASH),
        "stored_hash": h.get(HEADER_STORED_HASH),
        "source": h.get(HEADER_SOURCE),
        "sent": row["published_at"] is not None,
    }
