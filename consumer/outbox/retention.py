"""Retention: published outbox rows after ``outbox_retention_s``, inbox records after the window.

Deletes in small batches (``cleanup_batch`` rows), each its own short transaction, with
``SKIP LOCKED`` so every relay can run it at the same time, and within a time budget so a
large first clean-up never keeps a relay from publishing. It never deletes an outbox row that
is not yet published, nor an inbox record completed less than ``dedup_window_s`` ago (a
duplicate arriving inside the window must still find it). Choosing the window against the
topic's retention is discussed in docs/outbox.md.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from consumer.dedup import inbox
from consumer.outbox import store
from consumer.settings import Settings


@dataclass(slots=True)
class Purged:
    """What one retention pass deleted; ``finished`` is False when the budget ran out first."""

    outbox: int = 0
    inbox: int = 0
    finished: bool = True


def _count(status: str) -> int:
    # asyncpg returns the command tag, e.g. "DELETE 1000".
    return int(status.split()[-1])


async def purge(conn: Any, settings: Settings, budget_s: float = 2.0) -> Purged:
    """Delete expired rows in batches on ``conn`` (outside any transaction)."""
    out = Purged()
    deadline = time.monotonic() + budget_s
    batch = settings.cleanup_batch
    for table, query in (
        ("outbox", store.purge_published(settings.outbox_retention_s, batch)),
        ("inbox", inbox.expire(settings.dedup_window_s, batch)),
    ):
        while True:
            deleted = _count(await conn.execute(query[0], *query[1]))
            setattr(out, table, getattr(out, table) + deleted)
            if deleted < batch:
                break
            if time.monotonic() >= deadline:
                out.finished = False
                return out
            await asyncio.sleep(0)  # let the relay's other work (and the loop) breathe
    return out
