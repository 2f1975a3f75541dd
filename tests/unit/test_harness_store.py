"""MemoryTx and MemoryStore: the BatchTx semantics the runtime relies on, over dicts."""

from __future__ import annotations

import pytest

from consumer.dedup.inbox import Claim, Completion
from consumer.outbox.store import OutboxRow
from consumer.testing import MemoryKafka, MemoryStore
from consumer.testing.database import Failures, HandlerDb

pytestmark = pytest.mark.unit

NO_DB = HandlerDb(None, Failures())


def claim(key: str, digest: str = "h1") -> Claim:
    return Claim("ns", key, digest, "orders", 0, 7)


def row(topic: str) -> OutboxRow:
    return OutboxRow(topic, b"k", b"v", (("a", "b"),), f"ik-{topic}")


async def test_claim_takes_only_free_keys_and_completion_only_pending_rows() -> None:
    store = MemoryStore()
    async with store.begin(NO_DB) as tx:
        assert await tx.claim([claim("a"), claim("b")]) == {("ns", "a"), ("ns", "b")}
        assert await tx.claim([claim("a", "h2")]) == set()
        await tx.complete([Completion("ns", "a", "done", '{"n": [1, 2]}', None)])
        await tx.complete([Completion("ns", "a", "rejected", None, "late")])  # not pending
        await tx.unclaim([("ns", "a"), ("ns", "b")])  # removes only the pending one
    a = await store.record("ns", "a")
    assert a is not None and (a.hash, a.status, a.result, a.reason) == (
        "h1",
        "done",
        {"n": [1, 2]},
        None,
    )
    assert await store.record("ns", "b") is None


async def test_a_failed_transaction_leaves_no_trace() -> None:
    store = MemoryStore()
    with pytest.raises(RuntimeError, match="boom"):
        async with store.begin(NO_DB) as tx:
            await tx.claim([claim("a")])
            await tx.outbox([row("t")])
            await tx.advance_offset("g", "orders", 0, 5)
            raise RuntimeError("boom")
    assert await store.record("ns", "a") is None
    assert await store.stored_offset("g", "orders", 0) is None
    assert store.take_committed() == []


async def test_savepoints_restore_and_stay_established_after_rollback() -> None:
    store = MemoryStore()
    async with store.begin(NO_DB) as tx:
        await tx.claim([claim("a")])
        await tx.savepoint()
        await tx.outbox([row("first")])
        await tx.rollback_savepoint()
        await tx.outbox([row("second")])
        await tx.rollback_savepoint()  # as in PostgreSQL, the savepoint is still there
        await tx.outbox([row("kept")])
        await tx.release_savepoint()
        with pytest.raises(RuntimeError, match="without a savepoint"):
            await tx.rollback_savepoint()
    assert [r.topic for r in store.take_committed()] == ["kept"]
    assert store.take_committed() == []  # each committed row is relayed once
    assert (await store.record("ns", "a")) is not None


async def test_stored_offsets_only_move_forward() -> None:
    store = MemoryStore()
    async with store.begin(NO_DB) as tx:
        assert await tx.lock_offset("g", "orders", 0) == -1
        await tx.advance_offset("g", "orders", 0, 10)
        await tx.advance_offset("g", "orders", 0, 4)
        assert await tx.lock_offset("g", "orders", 0) == 10
    assert await store.stored_offset("g", "orders", 0) == 10
    assert await store.stored_offset("other", "orders", 0) is None


async def test_records_reads_what_exists() -> None:
    store = MemoryStore()
    async with store.begin(NO_DB) as tx:
        await tx.claim([claim("a")])
        found = await tx.records([("ns", "a"), ("ns", "zz")])
    assert list(found) == [("ns", "a")] and found[("ns", "a")].status == "pending"


def test_memory_kafka_offsets_per_partition_and_relay_to_partition_zero() -> None:
    kafka = MemoryKafka()
    a = kafka.append("t", b"1", partition=1)
    b = kafka.append("t", b"2", partition=1)
    c = kafka.append("t", b"3")
    published = kafka.publish(row("t"))
    assert [(m.partition, m.offset) for m in (a, b, c, published)] == [
        (1, 0),
        (1, 1),
        (0, 0),
        (0, 1),
    ]
    assert published.headers == (("a", b"b"),) and published.key == b"k"
    assert kafka.read("t", 1, 1) == [b] and kafka.end("t", 1) == 2
    assert kafka.messages("t") == [a, b, c, published]
    with pytest.raises(ValueError):
        kafka.append("t", b"x", partition=-1)


async def test_injected_db_failures_fire_the_given_number_of_times() -> None:
    failures = Failures()
    db = HandlerDb(None, failures)
    failures.arm(TimeoutError, times=2)
    for _ in range(2):
        with pytest.raises(TimeoutError, match="injected"):
            await db.fetchval("SELECT 1")
    with pytest.raises(ValueError):
        failures.arm(TimeoutError, times=0)
