"""Faults that put unusual records on the input topic: aborted transactions, unparseable records.

Each produces its own records with string ``chaos-id``s and adds their ground truth to an
:class:`~scripts.chaos.workload.Extra`, which the campaign merges into the truth before the
checker runs. Each ends with one ordinary payment on every partition it touched ("sentinels"):
a record after the transaction markers or the unparseable record, so that a partition can
only drain by moving past them, and so that a partition stalled behind them shows.
"""

from __future__ import annotations

import contextlib
import itertools

from aiokafka import AIOKafkaProducer

from consumer.testing.raw_records import send_raw
from scripts.chaos.workload import Extra, Record, partition_of

UNPARSEABLE_NAME = b"\xff\xfex-not-utf8"


async def _send(producer: AIOKafkaProducer, topic: str, records: list[Record]) -> None:
    futures = [
        await producer.send(topic, r.value, key=r.key, partition=r.partition, headers=r.headers)
        for r in records
    ]
    for fut in futures:
        await fut


async def sentinels(
    bootstrap: str, topic: str, extra: Extra, tag: str, partitions: set[int], n_parts: int
) -> None:
    """One applied payment on each of ``partitions``, sent after the fault's records."""
    records: list[Record] = []
    todo = set(partitions)
    for j in itertools.count():
        if not todo:
            break
        pid = f"{tag}-sentinel-{j}"
        if (part := partition_of(pid, n_parts)) in todo:
            todo.discard(part)
            records.append(extra.payment(f"{tag}-s{j}", pid, 100 + j, n_parts, _KEY))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await _send(producer, topic, records)
    finally:
        await producer.stop()


_KEY = {"kind": "fault_payment", "expect": "key"}


async def aborted_transactions(
    bootstrap: str, topic: str, extra: Extra, tag: str, n_parts: int, n: int = 12
) -> str:
    """``n`` keys in an aborted transaction, half of them then committed with another amount.

    None of the aborted records may take effect: a key only aborted stays unknown (outcome
    ``never``); a key aborted then committed applies the committed amount (an applied aborted
    copy would make the committed one a conflict).
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=f"chaos-{tag}", acks="all"
    )
    await producer.start()
    touched: set[int] = set()
    try:
        aborted: list[Record] = []
        committed: list[Record] = []
        for i in range(n):
            pid = f"{tag}-{i}"
            both = i % 2 == 0
            aborted.append(
                extra.payment(
                    f"{tag}-a{i}",
                    pid,
                    1_000_000 + i,  # if this one were applied, the ledger would show it
                    n_parts,
                    {"kind": "aborted", "expect": "aborted"},
                    outcome=None if both else "never",
                )
            )
            if both:
                committed.append(extra.payment(f"{tag}-c{i}", pid, 500 + i, n_parts, _KEY))
            touched.add(partition_of(pid, n_parts))
        await producer.begin_transaction()
        await _send(producer, topic, aborted)
        await producer.abort_transaction()
        await producer.begin_transaction()
        await _send(producer, topic, committed)
        await producer.commit_transaction()
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
    await sentinels(bootstrap, topic, extra, tag, touched, n_parts)
    return f"{len(aborted)} records aborted, {len(committed)} keys then committed"


async def unparseable_record(
    bootstrap: str, topic: str, extra: Extra, tag: str, n_parts: int
) -> str:
    """A payment whose header name is not UTF-8: it must become an ``undecodable`` dead letter
    and its partition must move on (the sentinel after it is applied)."""
    rec = extra.payment(
        f"{tag}-raw",
        f"{tag}-raw",
        100,
        n_parts,
        {"kind": "malformed", "expect": "dead:undecodable"},
        outcome=None,
    )
    headers: list[tuple[bytes, bytes | None]] = [(n.encode(), v) for n, v in rec.headers]
    headers.append((UNPARSEABLE_NAME, b"1"))
    (offset,) = await send_raw(bootstrap, topic, rec.partition, [(rec.key, rec.value, headers)])
    extra.unparseable[(topic, rec.partition, offset)] = {
        n: v.decode(errors="replace") for n, v in rec.headers
    }
    await sentinels(bootstrap, topic, extra, tag, {rec.partition}, n_parts)
    return f"header name {UNPARSEABLE_NAME!r} at {topic}/{rec.partition}/{offset}"
