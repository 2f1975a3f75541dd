"""What the live display and the chart show, read from the database and the broker.

Every count comes from committed state, never from worker logs: the stored positions
(``dedup.offsets``), the inbox (``dedup.inbox``) and the outbox rows the batches wrote
(``dedup.outbox``), in one statement so they share one snapshot; ``sent`` is the requested
topic's end offsets. Each consumed offset below a stored position was committed as exactly
one of applied, rejected, conflict, dead letter or duplicate, so duplicates are what is left.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from scripts.demo.setup import REQUESTED_PARTITIONS, Names

# next_offset is -1 on a row created by a batch that stored no position yet.
_COUNTS = """
SELECT
    (SELECT coalesce(sum(greatest(next_offset, 0)), 0) FROM dedup.offsets
      WHERE group_id = $1 AND topic = $2) AS consumed,
    i.applied,
    i.rejected,
    (SELECT count(*) FROM dedup.outbox WHERE topic = $4) AS conflicts,
    (SELECT count(*) FROM dedup.outbox WHERE topic = $5) AS dead_letters,
    (SELECT count(*) FROM dedup.outbox
      WHERE topic = ANY($6::text[]) AND published_at IS NULL) AS backlog
FROM (SELECT count(*) FILTER (WHERE status = 'done') AS applied,
             count(*) FILTER (WHERE status = 'rejected') AS rejected
        FROM dedup.inbox WHERE namespace = ANY($3::text[])) i
"""


@dataclass(frozen=True, slots=True)
class Sample:
    t_s: float  # seconds since the demo started
    sent: int
    consumed: int
    applied: int
    rejected: int  # overdrafts: recorded, dead-lettered
    conflicts: int
    dead_letters: int  # malformed records and rejections
    backlog: int  # outbox rows the relay has not published yet

    @property
    def duplicates(self) -> int:
        return self.consumed - self.applied - self.conflicts - self.dead_letters

    @property
    def malformed(self) -> int:
        return self.dead_letters - self.rejected

    @property
    def lag(self) -> int:
        return max(self.sent - self.consumed, 0)


class Probe:
    """Reads one :class:`Sample`; holds a database connection and a group-less consumer."""

    def __init__(self, dsn: str, bootstrap: str, names: Names, started: float) -> None:
        self.dsn, self.bootstrap, self.names, self.started = dsn, bootstrap, names, started
        self.pg: asyncpg.Connection | None = None
        self.kafka: AIOKafkaConsumer | None = None
        self.tps = [TopicPartition(names.requested, p) for p in range(REQUESTED_PARTITIONS)]

    async def start(self) -> None:
        self.pg = await asyncpg.connect(self.dsn)
        self.kafka = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await self.kafka.start()

    async def close(self) -> None:
        if self.kafka is not None:
            await self.kafka.stop()
        if self.pg is not None:
            await self.pg.close()

    async def sample(self) -> Sample:
        assert self.pg is not None and self.kafka is not None
        n = self.names
        ends = await self.kafka.end_offsets(self.tps)
        row = await self.pg.fetchrow(
            _COUNTS, n.group, n.requested, n.namespaces, n.conflicts, n.dlq, n.outputs
        )
        return Sample(
            t_s=time.monotonic() - self.started,
            sent=sum(ends.values()),
            consumed=int(row["consumed"]),
            applied=int(row["applied"]),
            rejected=int(row["rejected"]),
            conflicts=int(row["conflicts"]),
            dead_letters=int(row["dead_letters"]),
            backlog=int(row["backlog"]),
        )
