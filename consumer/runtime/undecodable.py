"""Records the Kafka client cannot parse become stand-ins, not exceptions out of ``getmany()``.

aiokafka parses a fetched record batch lazily, inside ``getmany()``: a header name that is not
UTF-8, a batch whose CRC does not match, a compressed batch that does not decompress or a
record whose lengths do not add up raises there, on every call, in every worker the partition
moves to, and the whole group goes down (issue 13, finding 14). Nothing the runtime does after
``getmany()`` can help: the records never come out.

:func:`install` wraps the ``MemoryRecords`` the fetcher builds for every fetch response. While
:func:`tolerant` is active (the worker's fetch loop only; every other consumer in the process
keeps aiokafka's behaviour), a batch that fails to parse is parsed again here, record by
record: records that parse are returned as usual; a record that does not is returned as a
stand-in whose ``checksum`` is an :class:`Undecodable` (no producer can set that field) and
whose value is its raw bytes. When the batch itself is broken (CRC, compression, framing),
one stand-in covers the rest of the batch and holds the batch's raw bytes. The runtime
dead-letters a stand-in as ``undecodable`` and moves the partition past it.
"""

from __future__ import annotations

import contextlib
import contextvars
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aiokafka import codec
from aiokafka.record.util import decode_varint

_TOLERANT: contextvars.ContextVar[bool] = contextvars.ContextVar("undecodable", default=False)

# Record batch v2 (KIP-98) header layout, fixed by the protocol.
_HEADER = struct.Struct(">qiibIhiqqqhii")
_HEADER_SIZE = _HEADER.size  # 61
_CODECS = {
    1: codec.gzip_decode,
    2: lambda b: codec.snappy_decode(bytes(b)),
    3: lambda b: codec.lz4_decode(bytes(b)),
    4: lambda b: codec.zstd_decode(bytes(b)),
}


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Why a stand-in was made (the dead letter's detail)."""

    reason: str


@dataclass(frozen=True, slots=True)
class _StandIn:
    """Shaped like an aiokafka record, as ``PartitionRecords._consumer_record`` reads it."""

    offset: int
    timestamp: int
    value: bytes
    checksum: Undecodable
    key: bytes | None = None
    timestamp_type: int = 0
    headers: tuple[tuple[str, bytes], ...] = ()


@contextlib.contextmanager
def tolerant() -> Iterator[None]:
    """Within this block (the worker's ``getmany()``), parse failures become stand-ins."""
    token = _TOLERANT.set(True)
    try:
        yield
    finally:
        _TOLERANT.reset(token)


def reason_of(record: Any) -> Undecodable | None:
    """The stand-in's reason, or None for a record aiokafka parsed."""
    mark = getattr(record, "checksum", None)
    return mark if isinstance(mark, Undecodable) else None


class _Batch:
    """One record batch: attributes from aiokafka's, records from a tolerant iterator."""

    def __init__(self, inner: Any, raw: bytes, error: Exception | None = None) -> None:
        self._inner = inner
        self._raw = raw
        self._error = error
        self._crc_ok = True
        self._it: Iterator[Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def base_offset(self) -> int:
        return int(self._inner.base_offset) if self._inner is not None else _base_offset(self._raw)

    @property
    def next_offset(self) -> int:
        if self._inner is not None:
            return int(self._inner.next_offset)
        return _next_offset(self._raw)

    @property
    def producer_id(self) -> int | None:
        return self._inner.producer_id if self._inner is not None else None

    @property
    def is_control_batch(self) -> bool:
        return bool(self._inner.is_control_batch) if self._inner is not None else False

    @property
    def is_transactional(self) -> bool:
        return bool(self._inner.is_transactional) if self._inner is not None else False

    def validate_crc(self) -> bool:
        # A mismatch is reported by a stand-in instead of CorruptRecordException. The broker
        # checked the CRC when the batch was written: a mismatch here does not go away.
        if self._inner is None:
            return True  # reported by the stand-in
        ok = bool(self._inner.validate_crc())
        if not ok and _TOLERANT.get() and not self.is_control_batch:
            self._crc_ok = False
            return True
        return ok

    def __iter__(self) -> _Batch:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = self._records()
        return next(self._it)

    def _records(self) -> Iterator[Any]:
        if self._inner is None or not self._crc_ok:
            why = f"{self._error}" if self._error else "record batch CRC mismatch"
            yield self._whole(why)
            return
        last = None
        try:
            for record in self._inner:
                last = record.offset
                yield record
            return
        except Exception as exc:
            if not _TOLERANT.get():
                raise
            error = exc
        yield from _salvage(self._raw, last, f"{type(error).__name__}: {error}", self._whole)

    def _whole(self, why: str) -> _StandIn:
        # At the batch's LAST offset: the fetcher drops records below its fetch position,
        # which may lie inside the batch, and then moves past the whole batch; one dead
        # letter at the last offset covers every offset of it that was not delivered.
        base, last = self.base_offset, self.next_offset - 1
        detail = (
            f"record batch at offsets {base}..{last} unreadable ({why}); "
            "value: the batch's raw bytes, as fetched"
        )
        return _StandIn(max(base, last), 0, self._raw, Undecodable(detail))


class TolerantRecords:
    """``MemoryRecords`` of one fetch response, handing out :class:`_Batch` wrappers."""

    def __init__(self, data: bytes) -> None:
        from aiokafka.record.memory_records import MemoryRecords

        self._data = bytes(data)
        self._inner = MemoryRecords(self._data)
        self._pos = 0

    def size_in_bytes(self) -> int:
        return int(self._inner.size_in_bytes())

    def has_next(self) -> bool:
        return bool(self._inner.has_next())

    def next_batch(self) -> Any:
        start = self._pos
        if len(self._data) - start >= 12:
            (length,) = struct.unpack_from(">i", self._data, start + 8)
            self._pos = start + 12 + max(0, length)
        raw = self._data[start : self._pos]
        try:
            inner = self._inner.next_batch()
        except Exception as exc:
            if not _TOLERANT.get() or len(raw) < 12:
                raise
            return _Batch(None, raw, exc)
        return None if inner is None else _Batch(inner, raw)


def install() -> None:
    """Make aiokafka's fetcher build :class:`TolerantRecords` (idempotent)."""
    from aiokafka.consumer import fetcher

    fetcher.MemoryRecords = TolerantRecords


# ---------------------------------------------------------------- the second parse


def _base_offset(raw: bytes) -> int:
    return int(struct.unpack_from(">q", raw, 0)[0])


def _next_offset(raw: bytes) -> int:
    if len(raw) >= 27:  # lastOffsetDelta is at byte 23 of a v2 batch header
        return _base_offset(raw) + int(struct.unpack_from(">i", raw, 23)[0]) + 1
    return _base_offset(raw) + 1


def _salvage(raw: bytes, last: int | None, error: str, whole: Any) -> Iterator[Any]:
    """Records of a v2 batch one at a time, after ``last``: parsed ones as records, a record
    that does not parse as a stand-in with its own bytes; a broken batch as one stand-in."""
    first = _base_offset(raw) if last is None else last + 1
    try:
        fields = _HEADER.unpack_from(raw, 0)
        magic, attributes, count, base_ts = fields[3], fields[5], fields[12], fields[7]
        if magic != 2:
            raise ValueError(f"message format v{magic}")
        body: bytes = raw[_HEADER_SIZE:]
        if attributes & 0x07:
            body = _CODECS[attributes & 0x07](memoryview(body))
        records = []
        pos = 0
        for _ in range(count):
            length, at = decode_varint(bytearray(body[pos : pos + 5]), 0)
            start, end = pos + at, pos + at + length
            if length < 0 or end > len(body):
                raise ValueError("record length beyond the batch")
            records.append(body[start:end])
            pos = end
    except Exception as exc:
        yield whole(f"{error}; {type(exc).__name__}: {exc}")
        return
    log_append = bool(attributes & 0x08)
    for rec in records:
        offset, parsed = _record(rec, fields, log_append)
        if offset < first:
            continue
        if isinstance(parsed, str):
            detail = f"{parsed}; value: the record's raw bytes (Kafka record format v2)"
            yield _StandIn(offset, base_ts, rec, Undecodable(detail))
        else:
            yield parsed


@dataclass(frozen=True, slots=True)
class _Parsed:
    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    checksum: None = None


def _record(rec: bytes, fields: tuple[Any, ...], log_append: bool) -> tuple[int, _Parsed | str]:
    """(offset, the record) or (offset, why it cannot be read)."""
    buf = bytearray(rec)
    base, base_ts, max_ts = fields[0], fields[7], fields[8]
    pos = 0
    offset = base
    try:
        _, pos = decode_varint(buf, pos)  # attributes, unused
        ts_delta, pos = decode_varint(buf, pos)
        offset_delta, pos = decode_varint(buf, pos)
        offset = base + offset_delta
        parts: list[bytes | None] = []
        for _ in range(2):
            n, pos = decode_varint(buf, pos)
            parts.append(bytes(buf[pos : pos + n]) if n >= 0 else None)
            pos += max(n, 0)
        count, pos = decode_varint(buf, pos)
        headers = []
        for i in range(count):
            n, pos = decode_varint(buf, pos)
            name_raw = bytes(buf[pos : pos + n])
            pos += n
            try:
                name = name_raw.decode("utf-8")
            except UnicodeDecodeError:
                return offset, f"header name {i} is not UTF-8 ({name_raw.hex()})"
            n, pos = decode_varint(buf, pos)
            headers.append((name, bytes(buf[pos : pos + n]) if n >= 0 else None))
            pos += max(n, 0)
        if pos != len(buf):
            return offset, f"record length {len(buf)} does not match its fields ({pos})"
    except Exception as exc:
        return offset, f"record does not parse ({type(exc).__name__}: {exc})"
    ts = max_ts if log_append else base_ts + ts_delta
    return offset, _Parsed(offset, ts, 1 if log_append else 0, parts[0], parts[1], tuple(headers))
