"""What happened to each message of a batch, and to the batch as a whole."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from consumer.message import Message


class Outcome(StrEnum):
    APPLIED = "applied"  # handler ran and its effects committed
    DUPLICATE = "duplicate"  # same key, same hash, already done or rejected
    CONFLICT = "conflict"  # same key, different hash: never applied, routed to .conflicts
    REJECTED = "rejected"  # definite failure: recorded and dead-lettered
    FAILED = "failed"  # transient failures past max_attempts: dead-lettered, nothing recorded
    INVALID = "invalid"  # never reached a handler: dead-lettered, nothing recorded
    SKIPPED = "skipped"  # below the stored position: already accounted for
    # retry="topics": a transient failure sent to <topic>.retry, nothing recorded; the copy
    # there ends as one of the above (consumer/runtime/retry_topics.py)
    DEFERRED = "deferred"


@dataclass(frozen=True, slots=True)
class Handled:
    message: Message
    outcome: Outcome
    namespace: str = ""
    key: str = ""
    hash: str = ""
    reason: str = ""
    result: Any = None


@dataclass
class BatchCounts:
    """Figures of one batch for the metrics (consumer/metrics.py); they decide nothing.

    ``fast_path``: keys whose Redis done marker the inbox confirmed (no claim); ``pg_path``:
    keys sent to the inbox.
    ``handler_s``: (handler name, seconds) of every handler call, including failed ones.
    """

    lease_acquired: int = 0
    lease_contended: int = 0  # keys found leased by another worker on the first try
    lease_renewed: int = 0
    fast_path: int = 0
    pg_path: int = 0
    handler_s: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class BatchResult:
    """``next_offset`` is the position now stored (None if nothing moved).

    ``retry_offset`` is set when the batch stopped on an indefinite failure: the partition
    must be re-read from there after ``retry_delay_s``. ``counts`` and ``duration_s`` are
    for the metrics.
    """

    handled: list[Handled] = field(default_factory=list)
    next_offset: int | None = None
    retry_offset: int | None = None
    retry_delay_s: float = 0.0
    error: str = ""
    # The batch failed as a whole on a value one of its records carried (SQLSTATE class 22,
    # a client-side encoding error): the processor isolates the records (runtime/batch.py).
    poisoned: bool = False
    # The stored position was behind the one this worker last committed or sought (only
    # `reset-positions` or a restored / failed-over database moves it back): nothing was
    # processed; the worker seeks to the stored position again (runtime/worker.py).
    moved_back: bool = False
    redis_degraded: bool = False
    counts: BatchCounts = field(default_factory=BatchCounts)
    duration_s: float = 0.0

    def count(self, outcome: Outcome) -> int:
        return sum(1 for h in self.handled if h.outcome is outcome)

    def merge(self, later: BatchResult) -> None:
        """Append a later batch of the same partition (records processed one at a time)."""
        self.handled += later.handled
        self.next_offset = later.next_offset if later.next_offset is not None else self.next_offset
        self.retry_offset, self.retry_delay_s = later.retry_offset, later.retry_delay_s
        self.error, self.poisoned = later.error, later.poisoned
        self.moved_back = later.moved_back
        self.redis_degraded = later.redis_degraded
        for f in fields(BatchCounts):
            setattr(
                self.counts, f.name, getattr(self.counts, f.name) + getattr(later.counts, f.name)
            )
