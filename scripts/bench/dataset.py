"""The benchmark's input: topics and PaymentRequested-like records, produced once per run.

Every leg reads the same pre-produced topic from its start. The producer records where each
record landed (partition, offset -> payment id) so that every leg's effects can be checked
against the exact set of keys it consumed. Records are ~300 bytes of msgpack; a share of them
(10% by default) are re-sends of an earlier record with a new ``sent_at``/``trace_id`` (fields
the handler excludes from the payload hash), as a retrying producer would send them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgpack
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

CHUNK = 5_000  # sends in flight before waiting for their acks


@dataclass
class Dataset:
    """Where each record of a topic landed: ``keys[partition][offset]`` is its payment id."""

    topic: str
    partitions: int
    keys: dict[int, list[str]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.keys.values())

    @property
    def ends(self) -> dict[int, int]:
        return {p: len(v) for p, v in self.keys.items()}

    def expected(self, positions: dict[int, int] | None = None) -> set[str]:
        """Distinct keys below ``positions`` (next offset per partition; default: all)."""
        out: set[str] = set()
        for p, keys in self.keys.items():
            end = len(keys) if positions is None else positions.get(p, 0)
            out.update(keys[:end])
        return out


class Payloads:
    """Deterministic payloads; ``next()`` returns (payment id, msgpack bytes), with re-sends."""

    def __init__(self, prefix: str, dup_ratio: float, seed: int = 7) -> None:
        self.prefix = prefix
        self.dup_ratio = dup_ratio
        self.rng = random.Random(seed)
        self.recent: list[dict[str, object]] = []
        self.n = 0

    def _fresh(self) -> dict[str, object]:
        self.n += 1
        rng = self.rng
        return {
            "schema_version": 1,
            "payment_id": f"{self.prefix}-{self.n:09d}",
            "account": f"acct-{rng.randrange(5_000):05d}",
            "cents": rng.randrange(1, 1_000_000),
            "currency": rng.choice(("EUR", "USD", "GBP")),
            # Filler so a record weighs ~300 bytes, like a real request with a description.
            "memo": "invoice "
            + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(115)),
            "sent_at": "",
            "trace_id": "",
        }

    def next(self) -> tuple[str, bytes]:
        rng = self.rng
        if self.recent and rng.random() < self.dup_ratio:
            # A re-send of a recent record: same identity, new transport fields. Some land in
            # the same batch as the original, most in a later one.
            body = dict(self.recent[-1 - rng.randrange(min(len(self.recent), 2_000))])
        else:
            body = self._fresh()
            self.recent.append(body)
            if len(self.recent) > 4_000:
                del self.recent[:2_000]
        body["sent_at"] = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        body["trace_id"] = f"{rng.getrandbits(128):032x}"
        return str(body["payment_id"]), msgpack.packb(body, use_bin_type=True)


async def delete_topics(bootstrap: str, names: list[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


def _producer(bootstrap: str, linger_ms: int) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks=1, linger_ms=linger_ms, max_batch_size=256 * 1024
    )


async def produce(
    bootstrap: str,
    topic: str,
    partitions: int,
    records: int,
    payloads: Payloads,
    progress: Callable[[int], None] | None = None,
) -> Dataset:
    """Produce ``records`` as fast as the broker takes them; returns where each one landed."""
    data = Dataset(topic, partitions, {p: [] for p in range(partitions)})
    landed: dict[int, dict[int, str]] = {p: {} for p in range(partitions)}
    producer = _producer(bootstrap, linger_ms=20)
    await producer.start()
    try:
        sent = 0
        while sent < records:
            n = min(CHUNK, records - sent)
            batch = [payloads.next() for _ in range(n)]
            futures = [await producer.send(topic, value, key=key.encode()) for key, value in batch]
            for (key, _), meta in zip(batch, await asyncio.gather(*futures), strict=True):
                landed[meta.partition][meta.offset] = key
            sent += n
            if progress:
                progress(sent)
    finally:
        await producer.stop()
    for p, by_offset in landed.items():
        # A fresh topic: offsets are 0..n-1 with no gaps (no transactions, no compaction).
        assert sorted(by_offset) == list(range(len(by_offset))), f"gap in partition {p}"
        data.keys[p] = [by_offset[o] for o in range(len(by_offset))]
    return data


async def produce_paced(
    bootstrap: str,
    topic: str,
    partitions: int,
    rate: float,
    duration_s: float,
    payloads: Payloads,
) -> Dataset:
    """Offer ``rate`` records/s for ``duration_s``; each record's timestamp is its send time."""
    data = Dataset(topic, partitions, {p: [] for p in range(partitions)})
    landed: dict[int, dict[int, str]] = {p: {} for p in range(partitions)}
    total = int(rate * duration_s)
    # Encode ahead of time so pacing costs as little CPU as possible while the worker runs.
    batch = [payloads.next() for _ in range(total)]
    producer = _producer(bootstrap, linger_ms=0)
    await producer.start()
    futures = []
    try:
        start = time.monotonic()
        sent = 0
        while sent < total:
            due = min(total, int((time.monotonic() - start) * rate) + 1)
            while sent < due:
                key, value = batch[sent]
                ts = int(time.time() * 1000)
                futures.append(await producer.send(topic, value, key=key.encode(), timestamp_ms=ts))
                sent += 1
            await asyncio.sleep(0.005)
        for (key, _), meta in zip(batch, await asyncio.gather(*futures), strict=True):
            landed[meta.partition][meta.offset] = key
    finally:
        await producer.stop()
    for p, by_offset in landed.items():
        data.keys[p] = [by_offset[o] for o in range(len(by_offset))]
    return data
