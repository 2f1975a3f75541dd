"""The observers a deployed worker runs with: Prometheus metrics and per-message log lines.

They subscribe to the runtime's events (consumer/observers.py); the runtime never calls
metrics or logs itself. The CLI and the test fixtures build workers with
:func:`standard_observers`; a user's own observer is added with ``Observers.add``.
"""

from __future__ import annotations

from consumer import logs
from consumer.metrics import MetricsObserver
from consumer.observers import Observer, Observers, Tick


class LogObserver(Observer):
    """One log line per handled message (consumer/logs.py)."""

    def __init__(self, hash_keys: bool) -> None:
        self.hash_keys = hash_keys

    def tick(self, tick: Tick) -> None:
        logs.log_outcomes(tick.results, self.hash_keys)


def standard_observers(hash_keys: bool = False) -> Observers:
    """Metrics and outcome logs: what ``consumer run`` and ``consumer relay`` subscribe."""
    return Observers([MetricsObserver(), LogObserver(hash_keys)])
