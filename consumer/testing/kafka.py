"""An in-memory Kafka for the test harness: topics are lists of records, offsets per partition.

It holds what was sent to the app and what the outbox relay would have published, as
:class:`consumer.message.Message` values, so tests assert on exactly what the runtime sees.
It models logs and positions only: no consumer groups, no retention, no broker failures.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from consumer.message import Message
from consumer.outbox.store import OutboxRow


@dataclass
class MemoryKafka:
    """Partitioned logs. ``append`` assigns the next offset of the partition."""

    logs: dict[tuple[str, int], list[Message]] = field(default_factory=dict)
    # Every record in the order it was appended, across topics and partitions.
    history: list[Message] = field(default_factory=list)

    def append(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Iterable[tuple[str, bytes]] = (),
        partition: int = 0,
    ) -> Message:
        if partition < 0:
            raise ValueError(f"partition must be >= 0, got {partition}")
        log = self.logs.setdefault((topic, partition), [])
        msg = Message(
            topic, partition, len(log), key, value, tuple(headers), int(time.time() * 1000)
        )
        log.append(msg)
        self.history.append(msg)
        return msg

    def publish(self, row: OutboxRow) -> Message:
        """What the outbox relay does with a committed row. Published rows go to partition 0."""
        headers = tuple((name, value.encode()) for name, value in row.headers)
        return self.append(row.topic, row.value, key=row.key, headers=headers)

    def read(self, topic: str, partition: int, start: int = 0) -> list[Message]:
        """Records of one partition from offset ``start`` to the end."""
        return list(self.logs.get((topic, partition), [])[max(start, 0) :])

    def end(self, topic: str, partition: int) -> int:
        """The offset the next record of this partition will get."""
        return len(self.logs.get((topic, partition), []))

    def messages(self, topic: str) -> list[Message]:
        """Every record of ``topic``, all partitions, in the order they were appended."""
        return [m for m in self.history if m.topic == topic]
