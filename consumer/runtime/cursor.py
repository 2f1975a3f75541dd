"""Where a partition is read from next: the rules the worker and the test harness share.

A partition's fetched records are processed as transactions of at most ``batch_max_records``;
a batch that stops (an indefinite failure) or finds its stored position moved back ends the
partition's turn, and the rest is read again: from the retry offset after its delay, or from
the stored position. :func:`next_position` is that rule in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from consumer.message import Message
from consumer.runtime.outcomes import BatchResult


class Processor(Protocol):
    async def process(self, records: Sequence[Message]) -> BatchResult: ...


async def process_partition(
    processor: Processor, msgs: Sequence[Message], size: int
) -> list[BatchResult]:
    """One partition's records, in order, as transactions of at most ``size`` records."""
    out: list[BatchResult] = []
    for start in range(0, len(msgs), size):
        result = await processor.process(msgs[start : start + size])
        out.append(result)
        if result.retry_offset is not None or result.moved_back:
            break  # the rest is re-read from the retry (or stored) position
    return out


@dataclass(frozen=True, slots=True)
class Next:
    """Read from ``offset`` after ``delay_s``; ``offset`` None: from the stored position."""

    offset: int | None
    delay_s: float = 0.0


def next_position(result: BatchResult, last_offset: int) -> Next:
    """Where the partition goes on after ``result``, whose records ended at ``last_offset``."""
    if result.moved_back:
        return Next(None)
    if result.retry_offset is not None:
        return Next(result.retry_offset, result.retry_delay_s)
    return Next(last_offset + 1)
