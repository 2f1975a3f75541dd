"""Per-worker counters: the one-line status, the demo display and the metrics read these."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from consumer.runtime.outcomes import BatchResult, Outcome


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    consumed: int = 0
    batches: int = 0
    retries: int = 0
    rebalances: int = 0
    by_outcome: dict[str, int] = field(default_factory=lambda: {o.value: 0 for o in Outcome})
    lag: dict[str, int] = field(default_factory=dict)
    partitions: list[str] = field(default_factory=list)
    redis_degraded: bool = False

    def add(self, result: BatchResult) -> None:
        self.batches += 1
        self.consumed += len(result.handled)
        for h in result.handled:
            self.by_outcome[h.outcome.value] += 1
        if result.retry_offset is not None:
            self.retries += 1
        self.redis_degraded = result.redis_degraded

    def fields(self, rate: float) -> dict[str, object]:
        """The status as data: the ``status`` field of a JSON log line. ``consumed`` is the
        sum of the outcomes listed (every Outcome has its field); retries are re-reads."""
        o = self.by_outcome
        return {
            "partitions": len(self.partitions),
            "msgs_per_s": round(rate, 1),
            "consumed": self.consumed,
            "applied": o["applied"],
            "duplicates": o["duplicate"],
            "conflicts": o["conflict"],
            "rejected": o["rejected"],
            "failed": o["failed"],
            "invalid": o["invalid"],
            "skipped": o["skipped"],
            "deferred": o["deferred"],  # sent to <topic>.retry (retry="topics")
            "retries": self.retries,
            "rebalances": self.rebalances,
            "lag": sum(self.lag.values()),
            "redis_degraded": self.redis_degraded,
        }

    def line(self, rate: float) -> str:
        o = self.by_outcome
        return (
            f"partitions={len(self.partitions)} msgs/s={rate:.0f} consumed={self.consumed} "
            f"applied={o['applied']} duplicates={o['duplicate']} conflicts={o['conflict']} "
            f"rejected={o['rejected']} failed={o['failed']} invalid={o['invalid']} "
            f"skipped={o['skipped']} deferred={o['deferred']} retries={self.retries} "
            f"lag={sum(self.lag.values())}" + (" redis=DEGRADED" if self.redis_degraded else "")
        )
