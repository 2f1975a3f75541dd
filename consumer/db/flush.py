"""The end of a batch transaction in one statement: complete, unclaim, outbox, position.

A partition batch used to finish with up to four statements, one round trip each: complete
the claimed rows, delete the claims it did not decide, write the outbox rows (and NOTIFY the
relay), move the stored position. Here they are data-modifying CTEs of one statement (each
runs to completion whether or not the final SELECT reads it, PostgreSQL docs, "WITH Queries",
7.8.4), so the batch pays one round trip instead of four; at small batches ("batch 100" on
6 partitions is ~17 records per transaction) those fixed costs dominate (issue 15). The
parts touch disjoint rows (completed and unclaimed keys never overlap; the offsets row is
locked by this transaction since ``lock_offset``), so running them in one snapshot changes
nothing. Each part's SQL is the one next to its table (consumer/dedup/inbox.py,
consumer/outbox/store.py, consumer/db/offsets.py), with its placeholders renumbered.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from consumer.db import offsets
from consumer.dedup import inbox
from consumer.dedup.inbox import Completion
from consumer.outbox import store as outbox
from consumer.outbox.store import OutboxRow
from consumer.types import Ident, Query

Position = tuple[str, str, int, int]  # group, topic, partition, next_offset

_PLACEHOLDER = re.compile(r"\$(\d+)")


def _shifted(text: str, by: int) -> str:
    return _PLACEHOLDER.sub(lambda m: f"${int(m.group(1)) + by}", text)


def statement(
    completions: Sequence[Completion],
    unclaim: Sequence[Ident],
    rows: Sequence[OutboxRow],
    position: Position | None,
) -> Query | None:
    """The one statement, or None when there is nothing to write."""
    parts: list[tuple[str, Query]] = []
    if completions:
        parts.append(("completed", inbox.complete(completions)))
    if unclaim:
        parts.append(("unclaimed", inbox.unclaim(unclaim)))
    if rows:
        parts.append(("written", outbox.insert_rows(rows)))
    if position is not None:
        parts.append(("advanced", offsets.advance(*position)))
    if not parts:
        return None
    ctes: list[str] = []
    args: list[Any] = []
    for name, (text, part_args) in parts:
        ctes.append(f"{name} AS ({_shifted(text, len(args))} RETURNING 1)")
        args.extend(part_args)
    notify = f", (SELECT {outbox.NOTIFY} WHERE EXISTS (SELECT 1 FROM written))" if rows else ""
    counts = ", ".join(f"(SELECT count(*) FROM {name})" for name, _ in parts)
    return f"WITH {', '.join(ctes)} SELECT {counts}{notify}", args
