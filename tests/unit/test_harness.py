"""TestApp in memory: sending, redelivery and every injected fault, with no service at all.

The scenarios shared with the real runtime live in tests/contract/; these cover the harness's
own API: what a result reports, how each fault is modelled, and that it fails loudly.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

import consumer
import consumer.testing
from consumer import App, Context, Outcome, Reject, Settings, TransientError
from consumer.testing import DatabaseRequired, HarnessError, TestApp, faults, payload

pytestmark = pytest.mark.unit


class Order(BaseModel):
    order_id: str
    quantity: int


def shop(**settings: Any) -> tuple[App, list[str]]:
    """An app whose handler publishes one event per order and logs every run."""
    runs: list[str] = []
    app = App("shop", settings=Settings(**settings))

    @app.handler("orders", schema=Order, key=lambda o: o.order_id)
    async def reserve(o: Order, ctx: Context) -> dict[str, int]:
        runs.append(o.order_id)
        if o.quantity < 0:
            raise Reject("negative quantity")
        if o.quantity == 0:
            raise TransientError("stock service unavailable")
        ctx.publish("reserved", {"order_id": o.order_id}, key=o.order_id)
        return {"reserved": o.quantity}

    @app.handler("by-header", schema=Order)
    async def by_header(o: Order, ctx: Context) -> str:
        return ctx.idempotency_key

    @app.handler("by-record-key", schema=Order, key="record")
    async def by_record_key(o: Order, ctx: Context) -> str:
        return ctx.namespace

    @app.handler("uses-sql", schema=Order, key=lambda o: o.order_id)
    async def uses_sql(o: Order, ctx: Context) -> None:
        try:
            await ctx.db.execute("SELECT 1")
        except Exception:  # a handler's catch-all must not hide the setup mistake
            pass

    return app, runs


def test_public_face() -> None:
    assert sorted(consumer.testing.__all__) == [
        "DatabaseRequired",
        "HarnessError",
        "MemoryKafka",
        "MemoryStore",
        "MemoryTx",
        "SendResult",
        "TestApp",
        "payload",
    ]
    assert not hasattr(consumer, "TestApp")  # the runtime's public face stays the runtime's
    assert TestApp.__test__ is False  # pytest must not try to collect it


async def test_send_reports_outcome_result_and_what_was_published() -> None:
    app, runs = shop()
    async with TestApp(app) as t:
        r = await t.send("orders", Order(order_id="o1", quantity=2))
        assert (r.outcome, r.result, r.reason) == (Outcome.APPLIED, {"reserved": 2}, "")
        assert (r.message.topic, r.message.partition, r.message.offset) == ("orders", 0, 0)
        assert r.message.header_str("content-type") == "application/msgpack"
        [event] = r.published
        assert (event.topic, event.key, payload(event)) == ("reserved", b"o1", {"order_id": "o1"})
        assert event.header_str("idempotency-key") == "shop.reserve:o1:0"
        assert t.published("reserved") == [event]
        assert (r.handler_calls, r.retry_delays_s, r.crashed) == (1, [], None)
        assert runs == ["o1"]


async def test_payload_forms_dict_json_and_raw_bytes() -> None:
    app, _ = shop()
    async with TestApp(app) as t:
        as_dict = await t.send("orders", {"order_id": "d", "quantity": 1})
        as_json = await t.send(
            "orders", {"order_id": "j", "quantity": 1}, content_type="application/json"
        )
        raw = await t.send("orders", b'{"order_id": "b", "quantity": 1}', content_type=None)
        assert as_dict.outcome is Outcome.APPLIED
        assert as_json.message.value == b'{"order_id":"j","quantity":1}'
        assert as_json.outcome is Outcome.APPLIED
        # Raw bytes without a content-type are read as msgpack, as the runtime does.
        assert (raw.outcome, raw.reason) == (Outcome.INVALID, "undecodable")


async def test_keys_from_header_and_record_key_and_tenant_namespaces() -> None:
    app, _ = shop()
    async with TestApp(app) as t:
        h = await t.send(
            "by-header", Order(order_id="x", quantity=1), headers={"idempotency-key": "k-7"}
        )
        assert (h.outcome, h.result) == (Outcome.APPLIED, "k-7")
        missing = await t.send("by-header", Order(order_id="x", quantity=1))
        assert (missing.outcome, missing.reason) == (Outcome.INVALID, "missing_key")
        rk = await t.send(
            "by-record-key", Order(order_id="x", quantity=1), key="rk", headers={"tenant": "acme"}
        )
        assert (rk.outcome, rk.result) == (Outcome.APPLIED, "shop.by_record_key@acme")
        assert await t.inbox("by-record-key", "rk") is None
        record = await t.inbox("by-record-key", "rk", tenant="acme")
        assert record is not None and record.status == "done"


async def test_redeliver_is_a_new_copy_by_default_and_skipped_at_the_same_offset() -> None:
    app, runs = shop()
    async with TestApp(app) as t:
        with pytest.raises(HarnessError, match="nothing was sent"):
            await t.redeliver()
        first = await t.send("orders", Order(order_id="o1", quantity=2), partition=1)
        copy = await t.redeliver()
        assert (copy.message.partition, copy.message.offset) == (1, 1)
        # The done marker spared the claim; the inbox confirmed it and gave the stored result.
        assert (copy.outcome, copy.reason) == (Outcome.DUPLICATE, "done")
        assert copy.result == first.result is not None
        elsewhere = await t.redeliver(partition=2)
        assert (elsewhere.message.partition, elsewhere.outcome) == (2, Outcome.DUPLICATE)
        same = await t.redeliver(same_offset=True)
        assert same.message == elsewhere.message
        assert same.outcome is Outcome.SKIPPED
        assert runs == ["o1"]
        assert len(t.published("reserved")) == 1
        assert first.published and not copy.published and not same.published


async def test_conflict_reject_and_invalid_go_to_their_topics() -> None:
    app, _ = shop()
    async with TestApp(app) as t:
        await t.send("orders", Order(order_id="o1", quantity=2))
        conflict = await t.send("orders", Order(order_id="o1", quantity=3))
        assert conflict.outcome is Outcome.CONFLICT
        assert conflict.published == t.conflicts("orders")
        rejected = await t.send("orders", Order(order_id="o2", quantity=-1))
        assert (rejected.outcome, rejected.reason) == (Outcome.REJECTED, "negative quantity")
        invalid = await t.send("orders", {"order_id": "o3"})
        assert (invalid.outcome, invalid.reason) == (Outcome.INVALID, "invalid_schema")
        reasons = [m.header_str("x-reason") for m in t.dead_letters("orders")]
        assert reasons == ["rejected", "invalid_schema"]


async def test_transient_failures_are_retried_without_waiting_until_attempts_run_out() -> None:
    app, runs = shop(max_attempts=3, retry_backoff_ms=100)
    async with TestApp(app) as t:
        r = await t.send("orders", Order(order_id="o1", quantity=0))
        assert r.outcome is Outcome.FAILED
        assert r.reason.startswith("attempts_exhausted (3): TransientError")
        assert r.handler_calls == 3 and runs == ["o1"] * 3
        assert r.retry_delays_s == [0.1, 0.2]
        assert t.published("reserved") == []
        [dead] = t.dead_letters("orders")
        assert dead.header_str("x-reason") == "failed"
        # Not a definite outcome: nothing recorded, so the key is not burned and a copy
        # (a replay of the dead letter) runs the handler again.
        assert await t.inbox("orders", "o1") is None
        again = await t.send("orders", Order(order_id="o1", quantity=0))
        assert (again.outcome, again.handler_calls) == (Outcome.FAILED, 3)
        assert runs == ["o1"] * 6


async def test_exhausted_outcome_rejected_records_the_exhaustion() -> None:
    app, runs = shop(max_attempts=2, retry_backoff_ms=0, exhausted_outcome="rejected")
    async with TestApp(app) as t:
        r = await t.send("orders", Order(order_id="o1", quantity=0))
        assert r.outcome is Outcome.REJECTED
        assert r.reason.startswith("attempts_exhausted (2): TransientError")
        [dead] = t.dead_letters("orders")
        assert dead.header_str("x-reason") == "rejected"
        record = await t.inbox("orders", "o1")
        assert record is not None and record.status == "rejected"
        again = await t.send("orders", Order(order_id="o1", quantity=0))
        assert (again.outcome, again.handler_calls) == (Outcome.DUPLICATE, 0)
        assert runs == ["o1"] * 2


async def test_a_message_that_never_settles_is_reported() -> None:
    app, _ = shop(max_attempts=50)
    async with TestApp(app, max_rounds=4) as t:
        with pytest.raises(HarnessError, match="still retrying after 4 rounds: TransientError"):
            await t.send("orders", Order(order_id="o1", quantity=0))


async def test_crash_after_commit_keeps_the_effect_and_leaves_the_lease() -> None:
    app, runs = shop()
    async with TestApp(app) as t:
        t.crash_after_commit()
        r = await t.send("orders", Order(order_id="o1", quantity=2))
        assert (r.crashed, r.outcome, r.result) == (
            "after_commit",
            Outcome.APPLIED,
            {"reserved": 2},
        )
        assert [h.outcome for h in r.handled] == [Outcome.APPLIED]  # the new worker skips it
        assert len(r.published) == 1  # committed rows are relayed whatever became of the worker
        # The dead worker neither wrote its done marker nor released its lease.
        assert t.leases.done == {} and list(t.leases.leases) == [("shop.reserve", "o1")]
        again = await t.redeliver()
        # The dead worker's lease is still there; the committed inbox row answers.
        assert (again.outcome, again.result) == (Outcome.DUPLICATE, {"reserved": 2})
        assert runs == ["o1"]


async def test_expire_lease_lets_the_next_worker_in_without_waiting() -> None:
    app, _ = shop()
    async with TestApp(app) as t:
        t.crash_after_commit()
        await t.send("orders", Order(order_id="o1", quantity=2))
        t.expire_lease()
        assert t.leases.leases == {}
        again = await t.redeliver()
        assert (again.outcome, again.retry_delays_s) == (Outcome.DUPLICATE, [])


async def test_crash_before_commit_runs_the_handler_again_and_applies_once() -> None:
    app, runs = shop()
    async with TestApp(app) as t:
        t.crash_before_commit()
        r = await t.send("orders", Order(order_id="o1", quantity=2))
        assert (r.crashed, r.outcome, r.handler_calls) == ("before_commit", Outcome.APPLIED, 2)
        assert runs == ["o1", "o1"]
        assert len(t.published("reserved")) == 1
        after = await t.send("orders", Order(order_id="o2", quantity=1))
        assert (after.crashed, after.handler_calls) == (None, 1)  # one crash per call


async def test_flush_redis_sends_duplicates_to_the_inbox() -> None:
    app, _ = shop()
    async with TestApp(app) as t:
        await t.send("orders", Order(order_id="o1", quantity=2))
        cached = await t.redeliver()
        t.flush_redis()
        stored = await t.redeliver()
        # Either way the inbox decides and gives the stored result: the marker only spares
        # the claim (tests/integration/test_store_divergence.py: a marker never decides).
        assert (cached.outcome, cached.result) == (Outcome.DUPLICATE, {"reserved": 2})
        assert (stored.outcome, stored.result) == (Outcome.DUPLICATE, {"reserved": 2})


async def test_sql_without_a_database_fails_the_test_loudly() -> None:
    app, _ = shop()
    async with TestApp(app) as t:
        with pytest.raises(DatabaseRequired, match=r"ctx\.db\.execute.*TestApp\(app, db="):
            await t.send("uses-sql", Order(order_id="o1", quantity=1))
        with pytest.raises(HarnessError, match="needs TestApp"):
            t.fail_next_db_call()
        with pytest.raises(HarnessError, match="no database"):
            t.db  # noqa: B018


async def test_faults_are_per_harness_and_never_global() -> None:
    fired: list[str] = []

    async def spy(point: str) -> None:
        fired.append(point)

    app, _ = shop()
    faults.install("after_commit", spy)
    try:
        async with TestApp(app) as one, TestApp(app) as other:
            one.crash_after_commit()
            r = await other.send("orders", Order(order_id="o1", quantity=1))
            assert r.crashed is None
            assert (await one.send("orders", Order(order_id="o1", quantity=1))).crashed
            # Separate stores: the same key is new to each harness.
            assert r.outcome is Outcome.APPLIED
    finally:
        faults.install("after_commit", None)
    assert fired == []


async def test_requests_with_reply_to_are_answered_again_on_duplicates() -> None:
    app, _ = shop()
    async with TestApp(app) as t:
        ask = {"reply-to": "answers"}
        first = await t.send("orders", Order(order_id="o1", quantity=2), headers=ask)
        again = await t.redeliver()
        replies = t.published("answers")
        assert [payload(m) for m in replies] == [{"reserved": 2}, {"reserved": 2}]
        assert replies[0].header_str("idempotency-key") == replies[1].header_str("idempotency-key")
        assert (first.outcome, again.outcome) == (Outcome.APPLIED, Outcome.DUPLICATE)
        unknown = await t.send("nobody-listens", Order(order_id="o1", quantity=2))
        assert unknown.outcome is Outcome.INVALID
        assert t.dead_letters("nobody-listens") == unknown.published
