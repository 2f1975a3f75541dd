"""Lifespan hooks, the dependency container and middleware, through TestApp in memory.

The same guarantees against the real services (a worker, PostgreSQL, Kafka): in
tests/integration/test_lifespan.py and test_middleware.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from pydantic import BaseModel

from consumer import (
    App,
    BatchContext,
    CallNext,
    ConfigError,
    Context,
    Item,
    Outcome,
    Reject,
    Settings,
    StartupFailed,
)
from consumer.logs import JsonFormatter, key_for_logs
from consumer.middlewares import LogContext, RateLimit
from consumer.middlewares.log_context import _hashed
from consumer.testing import TestApp

pytestmark = pytest.mark.unit


class Order(BaseModel):
    order_id: str


@dataclass
class Deps:
    label: str = ""
    events: list[str] = field(default_factory=list)


def lifespan_app(events: list[str], fail: str = "") -> App[Deps]:
    app = App("life", settings=Settings(max_attempts=1), deps=Deps)

    @app.on_startup
    async def first(deps: Deps) -> None:
        events.append("start first")
        deps.label = "real"

    @app.on_startup
    async def second() -> None:
        events.append("start second")
        if fail == "second":
            raise RuntimeError("no route to the ledger")

    @app.on_shutdown
    async def close_first(deps: Deps) -> None:
        events.append(f"stop first {deps.label}")

    @app.on_shutdown
    async def close_second() -> None:
        events.append("stop second")

    @app.handler("orders", schema=Order, key=lambda o: o.order_id)
    async def take(o: Order, ctx: Context[Deps]) -> str:
        events.append(f"handled {o.order_id} {ctx.deps.label} {ctx.handler}")
        return ctx.deps.label

    return app


async def test_hooks_run_in_order_and_shut_down_in_reverse() -> None:
    events: list[str] = []
    async with TestApp(lifespan_app(events)) as t:
        assert events == ["start first", "start second"]
        r = await t.send("orders", Order(order_id="o1"))
        assert r.outcome is Outcome.APPLIED and r.result == "real"
    assert events == [
        "start first",
        "start second",
        "handled o1 real life.take",
        "stop second",
        "stop first real",
    ]


async def test_replaced_deps_skip_the_hooks() -> None:
    events: list[str] = []
    async with TestApp(lifespan_app(events), deps=Deps(label="fake")) as t:
        r = await t.send("orders", Order(order_id="o1"))
        assert r.result == "fake"
        assert t.deps.label == "fake"
    assert events == ["handled o1 fake life.take"]  # no hook ran


async def test_replaced_deps_with_the_hooks_asked_for() -> None:
    events: list[str] = []
    async with TestApp(lifespan_app(events), deps=Deps(label="fake"), lifespan=True) as t:
        r = await t.send("orders", Order(order_id="o1"))
    assert r.result == "real"  # the hooks filled the given container
    assert events[:2] == ["start first", "start second"]


async def test_a_failing_startup_hook_consumes_nothing_and_runs_no_shutdown_hook() -> None:
    events: list[str] = []
    t = TestApp(lifespan_app(events, fail="second"))
    with pytest.raises(StartupFailed, match="second raised RuntimeError: no route to the ledger"):
        await t.send("orders", Order(order_id="o1"))
    assert events == ["start first", "start second"]
    assert not t.kafka.messages("orders")  # send gave up before appending


async def test_two_testapps_of_one_app_have_their_own_container() -> None:
    events: list[str] = []
    app = lifespan_app(events)
    async with TestApp(app, deps=Deps(label="a")) as a, TestApp(app, deps=Deps(label="b")) as b:
        assert (await a.send("orders", Order(order_id="o1"))).result == "a"
        assert (await b.send("orders", Order(order_id="o1"))).result == "b"
    assert all(h.deps is None and h.chain is None for h in app.handlers)  # the app untouched


# ---------------------------------------------------------------- middleware


def recording_app(seen: list[str], **settings: Any) -> App:
    app = App("mw", settings=Settings(max_attempts=1, **settings))

    @app.middleware
    async def outer(call_next: CallNext, payload: BaseModel, ctx: Context) -> Any:
        seen.append("outer in")
        try:
            return await call_next(payload)
        finally:
            seen.append("outer out")

    @app.middleware
    async def inner(call_next: CallNext, payload: BaseModel, ctx: Context) -> Any:
        seen.append(f"inner in {ctx.handler} {ctx.idempotency_key}")
        if isinstance(payload, Order) and payload.order_id == "deny":
            raise Reject("not allowed")
        result = await call_next(payload)
        seen.append("inner out")
        return result

    @app.handler("orders", schema=Order, key=lambda o: o.order_id)
    async def take(o: Order, ctx: Context) -> str:
        seen.append("handler")
        return o.order_id

    @app.batch_handler("bulk", schema=Order, key=lambda o: o.order_id)
    async def take_many(batch: list[Item[Order]], ctx: BatchContext) -> None:
        seen.append(f"batch of {len(batch)}")

    return app


async def test_middleware_runs_first_registered_outermost() -> None:
    seen: list[str] = []
    async with TestApp(recording_app(seen)) as t:
        r = await t.send("orders", Order(order_id="o1"))
    assert r.outcome is Outcome.APPLIED and r.result == "o1"
    assert seen == ["outer in", "inner in mw.take o1", "handler", "inner out", "outer out"]


async def test_a_middleware_reject_is_a_reject() -> None:
    seen: list[str] = []
    async with TestApp(recording_app(seen)) as t:
        r = await t.send("orders", Order(order_id="deny"))
        assert r.outcome is Outcome.REJECTED and r.reason == "not allowed"
        assert "handler" not in seen
        assert len(t.dead_letters("orders")) == 1
        assert (await t.redeliver()).outcome is Outcome.DUPLICATE  # recorded, as a handler's


async def test_batch_handlers_are_not_wrapped() -> None:
    seen: list[str] = []
    async with TestApp(recording_app(seen)) as t:
        rs = await t.send_batch("bulk", [Order(order_id="b1"), Order(order_id="b2")])
    assert [r.outcome for r in rs] == [Outcome.APPLIED] * 2
    assert seen == ["batch of 2"]


def misusing_app(calls: list[str], *, catch: bool) -> App:
    app = App("twice", settings=Settings(max_attempts=1))

    @app.middleware
    async def twice(call_next: CallNext, payload: BaseModel, ctx: Context) -> Any:
        first = await call_next(payload)
        try:
            await call_next(payload)
        except RuntimeError:
            if not catch:
                raise
        return first

    @app.handler("orders", schema=Order, key=lambda o: o.order_id)
    async def take(o: Order, ctx: Context) -> str:
        calls.append(o.order_id)
        return o.order_id

    return app


async def test_call_next_twice_never_runs_the_handler_twice() -> None:
    calls: list[str] = []
    async with TestApp(misusing_app(calls, catch=True)) as t:
        r = await t.send("orders", Order(order_id="o1"))
    assert r.outcome is Outcome.APPLIED and calls == ["o1"]


async def test_call_next_twice_is_the_middlewares_error() -> None:
    calls: list[str] = []
    async with TestApp(misusing_app(calls, catch=False)) as t:
        r = await t.send("orders", Order(order_id="o1"))
        assert r.outcome is Outcome.FAILED  # an unknown error: on_error="retry", 1 attempt
        assert "MiddlewareMisuse: a middleware called call_next twice" in r.reason
        assert await t.inbox("orders", "o1") is None  # nothing recorded, the key stays free
    assert calls == ["o1"]


async def test_a_shielded_call_next_that_outlives_its_middleware_is_cancelled() -> None:
    # asyncio.shield keeps the handler running after the middleware's wait_for gave up; left
    # running, it would use ctx.db outside the message's savepoint. Cancelled and waited for,
    # and the run fails as the middleware's error (nothing recorded, the key stays free).
    app = App("shield", settings=Settings(max_attempts=1))
    finished: list[str] = []

    @app.middleware
    async def impatient(call_next: CallNext, payload: BaseModel, ctx: Context) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(call_next(payload)), 0.01)
        except TimeoutError:
            return "fallback"

    @app.handler("orders", schema=Order, key=lambda o: o.order_id)
    async def slow(o: Order, ctx: Context) -> str:
        await asyncio.sleep(0.5)
        finished.append(o.order_id)
        return o.order_id

    async with TestApp(app) as t:
        r = await t.send("orders", Order(order_id="o1"))
        await asyncio.sleep(0.6)
        assert r.outcome is Outcome.FAILED
        assert "MiddlewareMisuse: a middleware returned while its call_next" in r.reason
        assert await t.inbox("orders", "o1") is None
    assert finished == []  # cancelled, not left to run on


def test_registration_refuses_what_cannot_work() -> None:
    app = App("refuse", settings=Settings())

    def sync_mw(call_next: CallNext, payload: BaseModel, ctx: Context) -> Any:
        return None

    async def two(call_next: CallNext, payload: BaseModel) -> Any:
        return None

    def sync_hook() -> None:
        return None

    with pytest.raises(ConfigError, match="must be an async function"):
        app.middleware(sync_mw)
    with pytest.raises(ConfigError, match=r"\(call_next, payload, ctx\); it takes 2"):
        app.middleware(two)
    with pytest.raises(ConfigError, match="must be an async function"):
        app.on_startup(sync_hook)  # type: ignore[type-var]
    with pytest.raises(ConfigError, match="class, not an instance"):
        App("refuse", deps=Deps())  # type: ignore[arg-type]
    app.middleware(RateLimit(5))  # an object with an async __call__ is one


# ---------------------------------------------------------------- the shipped middlewares


async def test_rate_limit_waits_for_each_token_in_turn() -> None:
    now = [100.0]
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)

    app = App("limited", settings=Settings())
    app.middleware(RateLimit({"limited.slow": 2.0}, burst=1, clock=lambda: now[0], sleep=sleep))

    @app.handler("slow", schema=Order, key=lambda o: o.order_id)
    async def slow(o: Order, ctx: Context) -> None:
        return None

    @app.handler("fast", schema=Order, key=lambda o: o.order_id)
    async def fast(o: Order, ctx: Context) -> None:
        return None

    async with TestApp(app) as t:
        for i in range(3):
            await t.send("slow", Order(order_id=f"s{i}"))  # no time passes: 1 token, 2/s
        assert waits == [0.5, 1.0]
        now[0] += 10.0  # the bucket refills, up to its burst
        await t.send("slow", Order(order_id="s3"))
        for i in range(5):
            await t.send("fast", Order(order_id=f"f{i}"))  # not named: never limited
    assert waits == [0.5, 1.0]


def test_rate_limit_refuses_nonsense() -> None:
    for bad in (0, -1.0, {"a": 0}):
        with pytest.raises(ConfigError, match="positive number"):
            RateLimit(bad)
    with pytest.raises(ConfigError, match="burst"):
        RateLimit(1, burst=0.5)


async def test_log_context_binds_the_message_for_the_handlers_lines() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    applog = logging.getLogger("tests.applog")
    applog.addHandler(handler)
    applog.setLevel(logging.INFO)
    app = App("logged", settings=Settings())
    app.middleware(LogContext(extra=lambda p, ctx: {"tenant": "acme"}))

    @app.handler("orders", schema=Order, key=lambda o: o.order_id)
    async def take(o: Order, ctx: Context) -> None:
        applog.info("taking %s", o.order_id)

    try:
        async with TestApp(app) as t:
            r = await t.send("orders", Order(order_id="o7"))
        applog.info("outside")
    finally:
        applog.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    m = r.message
    assert inside["msg"] == "taking o7"
    assert {k: inside[k] for k in ("handler", "key", "topic", "partition", "offset")} == {
        "handler": "logged.take",
        "key": "o7",
        "topic": "orders",
        "partition": m.partition,
        "offset": m.offset,
    }
    assert inside["attempt"] == 1 and inside["tenant"] == "acme"
    assert "key" not in outside and "topic" not in outside  # unbound afterwards
    assert structlog.contextvars.get_contextvars() == {}


def test_log_context_hashes_keys_as_the_framework_does() -> None:
    assert _hashed("k-1") == key_for_logs("k-1", True)
