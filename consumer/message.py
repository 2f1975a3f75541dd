"""The record as the runtime sees it: immutable, decoded headers, no Kafka client types."""

from __future__ import annotations

from dataclasses import dataclass, field


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
        return f"{self.topic}/{self.partition}/{self.offset}"
