"""Everything one batch transaction will write, accumulated, then flushed in one place.

The arms of the transaction (runtime/transaction.py) never write as they go: they append
completions, outbox rows (dead letters, conflicts, replies, handlers' messages), done markers
and handled outcomes here, and set where the partition stops. :meth:`Writes.flush` then issues
the batch's shared writes (complete, unclaim, outbox, stored position) as one statement on
PostgreSQL (consumer/db/flush.py), so what a batch commits can be read off one object
(docs/design.md, "Decide, then write").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from consumer.db.tx import BatchTx
from consumer.dedup.inbox import Completion
from consumer.dedup.leases import DoneMarker
from consumer.outbox.store import OutboxRow
from consumer.runtime.outcomes import BatchResult
from consumer.types import Ident


@dataclass(slots=True)
class Writes:
    """The batch's pending writes, and its result as built so far."""

    next_offset: int | None  # the stored position after this batch (None: nothing live)
    result: BatchResult = field(default_factory=BatchResult)
    completions: list[Completion] = field(default_factory=list)
    rows: list[OutboxRow] = field(default_factory=list)
    markers: list[DoneMarker] = field(default_factory=list)  # after commit only

    def stop(self, offset: int, delay_s: float, error: str) -> None:
        """The batch ends before the record at ``offset``: it is re-read from there."""
        self.next_offset = offset
        self.result.retry_offset = offset
        self.result.retry_delay_s = delay_s
        self.result.error = error

    async def flush(
        self, tx: BatchTx, group: str, topic: str, partition: int, stored: int, unclaim: list[Ident]
    ) -> None:
        """The shared statements (one on PostgreSQL). ``unclaim``: claimed rows no run
        decided."""
        position = None
        if self.next_offset is not None and self.next_offset > stored:
            position = (group, topic, partition, self.next_offset)
        await tx.write(self.completions, unclaim, self.rows, position)
        if position is not None:
            self.result.next_offset = self.next_offset
