"""Produce records that aiokafka's producer refuses to build: header names that are not UTF-8.

Kafka's wire format allows any bytes as a header name, and other clients (the Java producer,
librdkafka) send them; aiokafka's producer encodes every name with ``str.encode`` and its
C record builder accepts only ``str``. To test what a worker does with such a record (today
aiokafka's ``getmany`` raises on it), this module builds the record batch with aiokafka's
pure-Python builder, which writes ``name.encode()``, and hands it a ``str`` whose ``encode``
returns the raw bytes, then sends the batch through the producer's public ``send_batch``.

Used by the chaos campaign (the ``unparseable_record`` fault) and by integration tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy

RawHeaders = Sequence[tuple[bytes, bytes | None]]


class _RawName(str):
    """A header name the pure-Python builder writes as the given bytes, whatever they are."""

    raw: bytes

    def __new__(cls, raw: bytes) -> _RawName:
        obj = super().__new__(cls, raw.decode("latin-1"))
        obj.raw = raw
        return obj

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self.raw


async def send_raw(
    bootstrap: str,
    topic: str,
    partition: int,
    records: Sequence[tuple[bytes | None, bytes | None, RawHeaders]],
) -> list[int]:
    """Send ``(key, value, headers)`` records, header names as raw bytes; their offsets.

    All records go to ``partition`` in one batch, acked by all in-sync replicas.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        batch: Any = producer.create_batch()
        # Same arguments BatchBuilder gives the C builder, but the builder that calls encode.
        batch._builder = _DefaultRecordBatchBuilderPy(
            magic=2,
            compression_type=0,
            is_transactional=0,
            producer_id=-1,
            producer_epoch=-1,
            base_sequence=0,
            batch_size=1 << 20,
        )
        for key, value, headers in records:
            names = [(_RawName(name), v) for name, v in headers]
            if batch.append(key=key, value=value, timestamp=None, headers=names) is None:
                raise ValueError("records do not fit in one 1 MiB batch")
        meta = await (await producer.send_batch(batch, topic, partition=partition))
        base = int(meta.offset)
        return [base + i for i in range(len(records))]
    finally:
        await producer.stop()
