"""The record as the runtime sees it: immutable, decoded headers, no Kafka client types.

Also the one written form of a Kafka position, ``topic/partition/offset`` (:func:`location`):
the CLI, the logs, the ``x-source`` header and the derived keys ``dlq:<location>`` all use
it. Not ``topic/partition@offset``: ``@`` already joins a handler name and a tenant
(consumer/keys.py), and the derived keys (idempotency keys downstream) must never change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LOCATION_SEPARATOR = "/"


def location(topic: str, partition: int, offset: int) -> str:
    """A Kafka position as people read it everywhere: ``topic/partition/offset``.

    Unambiguous: Kafka topic names cannot contain ``/``.
    """
    return f"{topic}{LOCATION_SEPARATOR}{partition}{LOCATION_SEPARATOR}{offset}"


def parse_location(text: str) -> tuple[str, int, int] | None:
    """``(topic, partition, offset)`` of a :func:`location`, or None if it is not one."""
    parts = text.rsplit(LOCATION_SEPARATOR, 2)
    if len(parts) != 3 or not parts[0] or not (parts[1].isdigit() and parts[2].isdigit()):
        return None
    return parts[0], int(parts[1]), int(parts[2])


@dataclass(frozen=True, slots=True)
class Message:
    """One consumed Kafka record. ``headers`` values are raw bytes, as on the wire."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 0
    # Set when the Kafka client could not parse the record (consumer/runtime/undecodable.py):
    # why; ``value`` then holds the raw bytes and the record is dead-lettered as undecodable.
    undecodable: str = ""
    # Set for a record read from ``<topic>.retry`` (consumer/runtime/retry_topics.py): the
    # source topic it is a retry of, whose .dlq and .conflicts its envelopes go to.
    retry_of: str = ""
    _index: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name`` (case-insensitive), or None."""
        if not self._index and self.headers:
            for k, v in self.headers:
                self._index[k.lower()] = v
        return self._index.get(name.lower())

    def header_str(self, name: str) -> str | None:
        raw = self.header(name)
        if raw is None:
            return None
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return None

    @property
    def source(self) -> str:
        """Where it was read: ``topic/partition/offset`` (:func:`location`)."""
        return location(self.topic, self.partition, self.offset)
