"""Events the runtime emits, and the observers that subscribe to them.

The fetch loop, the rebalance listener and the relay do their work and *tell* what happened;
metrics (consumer/metrics.py), per-message logs (consumer/logs.py) and anything a user adds
subscribe here instead of being called from the loops (dramatiq's middleware hooks). Events
are facts after the fact: an observer cannot change an outcome, and an observer that raises is
logged and ignored, never allowed to fail a batch or a rebalance.

This module imports nothing from the layers that emit or observe, so every layer may use it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from consumer.runtime.outcomes import BatchResult
    from consumer.runtime.stats import Stats

log = logging.getLogger("consumer.observers")


class Partition(Protocol):
    """A Kafka topic-partition, as aiokafka's ``TopicPartition`` has it."""

    topic: str
    partition: int


class RelayFigures(Protocol):
    """The relay's cumulative counters (consumer/outbox/relay.py)."""

    published: int
    failed: int
    errors: int
    given_up: dict[str, int]
    backlog: int
    oldest_age_s: float


@dataclass(frozen=True, slots=True)
class Tick:
    """One fetch-loop iteration: one result per partition batch, in order, after commit."""

    group: str
    partitions: Sequence[Partition]
    results: Sequence[BatchResult]
    stats: Stats
    handler_names: dict[str, str]  # topic -> handler name, for labels


class Observer:
    """Subscribe by overriding any of these; every method defaults to doing nothing."""

    def committed(self, result: BatchResult) -> None:
        """A batch transaction committed (before done markers, lease release, Kafka commit)."""

    def tick(self, tick: Tick) -> None:
        """Batches of one fetch-loop iteration committed (or stopped)."""

    def revoked(self, partitions: Sequence[Partition]) -> None:
        """A rebalance took these partitions away."""

    def halted(self, topic: str, partition: int, reason: str, halted: bool) -> None:
        """A partition halted at a position the broker lacks (True), or resumed (False)."""

    def relay_pass(self, relay: RelayFigures) -> None:
        """The relay finished a pass (its figures are cumulative)."""


class Observers(Observer):
    """Fans every event out to its members; one that raises is logged and skipped."""

    def __init__(self, members: Iterable[Observer] = ()) -> None:
        self.members: list[Observer] = list(members)

    def add(self, observer: Observer) -> None:
        self.members.append(observer)

    def _each(self, event: str, *args: Any) -> None:
        for m in self.members:
            try:
                getattr(m, event)(*args)
            except Exception:
                log.exception("observer %s failed on %s; ignored", type(m).__name__, event)

    def committed(self, result: BatchResult) -> None:
        self._each("committed", result)

    def tick(self, tick: Tick) -> None:
        self._each("tick", tick)

    def revoked(self, partitions: Sequence[Partition]) -> None:
        self._each("revoked", partitions)

    def halted(self, topic: str, partition: int, reason: str, halted: bool) -> None:
        self._each("halted", topic, partition, reason, halted)

    def relay_pass(self, relay: RelayFigures) -> None:
        self._each("relay_pass", relay)
