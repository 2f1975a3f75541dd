"""The contract: the same scenarios, the same observations, on the harness and the runtime.

Each test runs three times (see conftest.py): ``TestApp`` in memory, ``TestApp`` on real
PostgreSQL, and a real Worker on real Kafka, Redis and PostgreSQL. If the harness drifted
from the runtime (outcomes, reasons, stored results, outbox rows), one of them would fail.
"""

from __future__ import annotations

from consumer import Outcome, keys
from tests.contract.drivers import Driver
from tests.contract.subject import item


async def published(d: Driver) -> list[object]:
    return [m.value for m in await d.messages(d.out)]


async def test_applied(driver: Driver) -> None:
    seen = await driver.send(item("a", 5))
    assert seen.outcome is Outcome.APPLIED
    assert seen.result == {"id": "a", "amount": 5, "attempt": 1}
    assert await published(driver) == [{"id": "a", "amount": 5}]
    record = await driver.inbox("a")
    assert record is not None
    assert (record.status, record.result) == ("done", seen.result)
    assert driver.calls["a"] == 1


async def test_duplicate_is_not_applied_again(driver: Driver) -> None:
    first = await driver.send(item("d", 1))
    again = await driver.send(item("d", 1), partition=1)
    assert (first.outcome, again.outcome) == (Outcome.APPLIED, Outcome.DUPLICATE)
    assert again.reason == "done"
    assert driver.calls["d"] == 1
    assert await published(driver) == [{"id": "d", "amount": 1}]


async def test_conflict_is_never_applied_nor_answered(driver: Driver) -> None:
    first = await driver.send(item("c", 1))
    other = await driver.send(item("c", 2))
    assert other.outcome is Outcome.CONFLICT
    assert other.result is None
    record = await driver.inbox("c")
    assert record is not None and record.result == first.result
    [conflict] = await driver.messages(driver.topic + ".conflicts")
    assert conflict.headers["x-reason"] == "conflict"
    assert conflict.headers["x-stored-hash"] == record.hash
    assert conflict.headers["x-payload-hash"] != record.hash
    assert conflict.value == item("c", 2)
    assert driver.calls["c"] == 1
    assert await published(driver) == [{"id": "c", "amount": 1}]


async def test_reject_then_duplicate_of_the_reject(driver: Driver) -> None:
    first = await driver.send(item("r", 1, reject=True))
    assert (first.outcome, first.reason) == (Outcome.REJECTED, "refused r")
    again = await driver.send(item("r", 1, reject=True))
    assert (again.outcome, again.reason) == (Outcome.DUPLICATE, "rejected")
    record = await driver.inbox("r")
    assert record is not None and (record.status, record.reason) == ("rejected", "refused r")
    [dead] = await driver.messages(driver.topic + ".dlq")
    assert (dead.headers["x-reason"], dead.headers["x-detail"]) == ("rejected", "refused r")
    assert dead.value == item("r", 1, reject=True)
    assert driver.calls["r"] == 1
    assert await published(driver) == []  # the publish before the Reject was rolled back


async def test_invalid_records_nothing_under_the_key(driver: Driver) -> None:
    garbage = await driver.send(b"\xc1")
    incomplete = await driver.send({"id": "v"})
    assert (garbage.outcome, garbage.reason) == (Outcome.INVALID, "undecodable")
    assert (incomplete.outcome, incomplete.reason) == (Outcome.INVALID, "invalid_schema")
    dead = await driver.messages(driver.topic + ".dlq")
    assert [m.headers["x-reason"] for m in dead] == ["undecodable", "invalid_schema"]
    assert await driver.inbox("v") is None
    corrected = await driver.send(item("v", 3))
    assert corrected.outcome is Outcome.APPLIED
    assert driver.calls["v"] == 1


async def test_transient_failure_then_success(driver: Driver) -> None:
    seen = await driver.send(item("t", 1, fail_first=True))
    assert seen.outcome is Outcome.APPLIED
    assert seen.result == {"id": "t", "amount": 1, "attempt": 2}
    assert driver.calls["t"] == 2
    assert await published(driver) == [{"id": "t", "amount": 1}]


async def test_crash_after_commit_applies_once(driver: Driver) -> None:
    driver.crash_next("after_commit")
    crashed = await driver.send(item("k", 1))
    assert crashed.crashed == "after_commit"
    record = await driver.inbox("k")
    assert record is not None and record.status == "done"
    # No done marker was written and the dead worker's lease had to expire: the inbox answers.
    again = await driver.send(item("k", 1))
    assert (again.outcome, again.result) == (Outcome.DUPLICATE, record.result)
    assert driver.calls["k"] == 1
    assert await published(driver) == [{"id": "k", "amount": 1}]


async def test_crash_before_commit_runs_twice_applies_once(driver: Driver) -> None:
    driver.crash_next("before_commit")
    seen = await driver.send(item("b", 1))
    assert (seen.crashed, seen.outcome) == ("before_commit", Outcome.APPLIED)
    assert driver.calls["b"] == 2
    assert await published(driver) == [{"id": "b", "amount": 1}]


async def test_redis_losing_every_key_changes_nothing(driver: Driver) -> None:
    first = await driver.send(item("f", 1))
    await driver.flush_redis()
    again = await driver.send(item("f", 1), partition=2)
    assert (again.outcome, again.result) == (Outcome.DUPLICATE, first.result)
    await driver.flush_redis()
    other = await driver.send(item("f", 9))
    assert other.outcome is Outcome.CONFLICT
    assert driver.calls["f"] == 1
    assert await published(driver) == [{"id": "f", "amount": 1}]


async def test_derived_keys_escape_separators_in_the_key(driver: Driver) -> None:
    """A key holding ``:`` and ``%`` yields one unambiguous published idempotency key, the
    same on both sides (consumer/keys.py): ``<ns>:<key escaped>:<index>``."""
    seen = await driver.send(item("7:inv-3%", 2))
    assert seen.outcome is Outcome.APPLIED
    [event] = await driver.messages(driver.out)
    ns, key, index = keys.split(event.headers["idempotency-key"])
    assert (key, index) == ("7:inv-3%", "0")
    assert event.headers["idempotency-key"] == f"{ns}:7%3Ainv-3%25:0"
