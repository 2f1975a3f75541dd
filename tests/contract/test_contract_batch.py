"""The contract for several records in one batch, with the batch-handler subject.

test_contract.py runs every scenario with the batch handler too (one record per batch: the
per-message path). These send records that reach the worker together, so the batch handler
gets them in one call (consumer/runtime/batch_run.py), on each backend: every outcome, record
and outbox row is still exactly what the per-message handler gives, including when the call
falls back to one record at a time (a Retry, an exception, a timeout).
"""

from __future__ import annotations

from consumer import Outcome
from tests.contract.drivers import Driver
from tests.contract.subject import item
from tests.contract.test_contract import published


async def test_one_call_for_the_new_records_copies_and_conflicts_decided(
    batch_driver: Driver,
) -> None:
    d = batch_driver
    assert (await d.send(item("p", 1))).outcome is Outcome.APPLIED
    seen = await d.send_batch(
        [item("a", 1), item("b", 2), item("a", 1), item("b", 3), item("p", 1), item("p", 9)]
    )
    assert [s.outcome for s in seen] == [
        Outcome.APPLIED,
        Outcome.APPLIED,
        Outcome.DUPLICATE,
        Outcome.CONFLICT,
        Outcome.DUPLICATE,
        Outcome.CONFLICT,
    ]
    assert seen[1].result == {"id": "b", "amount": 2, "attempt": 1}
    assert d.calls["<batch of 2>"] == 1  # a and b, once: copies and known keys never reach it
    assert (d.calls["a"], d.calls["b"], d.calls["p"]) == (1, 1, 1)
    assert await published(d) == [
        {"id": "p", "amount": 1},
        {"id": "a", "amount": 1},
        {"id": "b", "amount": 2},
    ]
    record = await d.inbox("b")
    assert record is not None and (record.status, record.result) == ("done", seen[1].result)
    assert len(await d.messages(d.topic + ".conflicts")) == 2


async def test_a_rejected_item_alone_is_rejected_in_the_same_call(batch_driver: Driver) -> None:
    d = batch_driver
    seen = await d.send_batch([item("x", 1), item("r", 1, reject=True), item("y", 1)])
    assert [s.outcome for s in seen] == [Outcome.APPLIED, Outcome.REJECTED, Outcome.APPLIED]
    assert seen[1].reason == "refused r"
    assert d.calls["<batch of 3>"] == 1 and d.calls["r"] == 1
    assert await published(d) == [{"id": "x", "amount": 1}, {"id": "y", "amount": 1}]
    [dead] = await d.messages(d.topic + ".dlq")
    assert (dead.headers["x-reason"], dead.headers["x-detail"]) == ("rejected", "refused r")
    record = await d.inbox("r")
    assert record is not None and (record.status, record.reason) == ("rejected", "refused r")
    again = await d.send(item("r", 1, reject=True))
    assert (again.outcome, again.reason) == (Outcome.DUPLICATE, "rejected")


async def test_a_retried_item_falls_back_and_burns_nothing(batch_driver: Driver) -> None:
    d = batch_driver
    seen = await d.send_batch([item("x", 1), item("t", 1, fail_first=True), item("y", 1)])
    assert [s.outcome for s in seen] == [Outcome.APPLIED] * 3
    assert [s.result["attempt"] for s in seen] == [1, 2, 1]
    # The call for three was rolled back; x ran alone and committed, t stopped the batch
    # (nothing recorded for t or y), then t (attempt 2) and y were called together.
    assert (d.calls["<batch of 3>"], d.calls["<batch of 1>"], d.calls["<batch of 2>"]) == (1, 2, 1)
    assert await published(d) == [
        {"id": "x", "amount": 1},
        {"id": "t", "amount": 1},
        {"id": "y", "amount": 1},
    ]
    assert await d.messages(d.topic + ".dlq") == []


async def test_an_exception_for_the_batch_falls_back_to_exact_outcomes(
    batch_driver: Driver,
) -> None:
    d = batch_driver
    seen = await d.send_batch(
        [item("x", 1), item("f", 1, fail_batch=True), item("r", 1, reject=True)]
    )
    assert [s.outcome for s in seen] == [Outcome.APPLIED, Outcome.APPLIED, Outcome.REJECTED]
    assert (d.calls["<batch of 3>"], d.calls["<batch of 1>"]) == (1, 3)
    assert await published(d) == [{"id": "x", "amount": 1}, {"id": "f", "amount": 1}]
    [dead] = await d.messages(d.topic + ".dlq")
    assert dead.headers["x-detail"] == "refused r"


async def test_a_timeout_of_the_call_falls_back(batch_driver: Driver) -> None:
    d = batch_driver
    seen = await d.send_batch([item("x", 1), item("h", 1, hang_batch=True)])
    assert [s.outcome for s in seen] == [Outcome.APPLIED, Outcome.APPLIED]
    assert (d.calls["<batch of 2>"], d.calls["<batch of 1>"]) == (1, 2)
    assert await published(d) == [{"id": "x", "amount": 1}, {"id": "h", "amount": 1}]


async def test_crash_before_commit_calls_again_applies_once(batch_driver: Driver) -> None:
    d = batch_driver
    d.crash_next("before_commit")
    seen = await d.send_batch([item("a", 1), item("b", 1)])
    assert [(s.crashed, s.outcome) for s in seen] == [("before_commit", Outcome.APPLIED)] * 2
    assert d.calls["<batch of 2>"] == 2
    assert await published(d) == [{"id": "a", "amount": 1}, {"id": "b", "amount": 1}]


async def test_crash_after_commit_applies_once(batch_driver: Driver) -> None:
    d = batch_driver
    d.crash_next("after_commit")
    seen = await d.send_batch([item("a", 1), item("b", 1)])
    assert [s.crashed for s in seen] == ["after_commit"] * 2
    for key in ("a", "b"):
        record = await d.inbox(key)
        assert record is not None and record.status == "done"
    again = await d.send_batch([item("a", 1), item("b", 1)])
    assert [s.outcome for s in again] == [Outcome.DUPLICATE] * 2
    assert d.calls["<batch of 2>"] == 1
    assert await published(d) == [{"id": "a", "amount": 1}, {"id": "b", "amount": 1}]
