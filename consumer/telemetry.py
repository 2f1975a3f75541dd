"""The observers a deployed worker runs with: Prometheus metrics and per-message log lines.

They subscribe to the runtime's events (consumer/observers.py); the runtime never calls
metrics or logs itself. The CLI and the test fixtures build workers with
:func:`standard_observers`; a user's own observer is added with ``Observers.add``.
"""

from __future__ import annotations

from collections.abc import Sequence

from consumer import logs, metrics
from consumer.app import App
from consumer.observers import Observer, Observers, Partition, RelayFigures, Tick


class MetricsObserver(Observer):
    """consumer/metrics.py, fed from the events."""

    def __init__(self, app: App | None = None) -> None:
        self.app = app

    def tick(self, tick: Tick) -> None:
        if self.app is not None:
            metrics.record_tick(self.app, tick.partitions, tick.results, tick.stats)

    def revoked(self, partitions: Sequence[Partition]) -> None:
        metrics.record_revoked(partitions)

    def halted(self, topic: str, partition: int, reason: str, halted: bool) -> None:
        metrics.record_halted(topic, partition, reason, halted)

    def relay_pass(self, relay: RelayFigures) -> None:
        metrics.record_relay(relay)


class LogObserver(Observer):
    """One log line per handled message (consumer/logs.py)."""

    def __init__(self, hash_keys: bool) -> None:
        self.hash_keys = hash_keys

    def tick(self, tick: Tick) -> None:
        logs.log_outcomes(tick.results, self.hash_keys)


def standard_observers(app: App | None = None, hash_keys: bool = False) -> Observers:
    """Metrics and outcome logs: what ``consumer run`` and ``consumer relay`` subscribe."""
    return Observers([MetricsObserver(app), LogObserver(hash_keys)])
