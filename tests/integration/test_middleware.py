"""Middleware that misbehaves cannot break the guarantees: a real worker, Kafka, PostgreSQL.

Each middleware runs inside the message's savepoint (consumer/middleware.py). One that
swallows the handler's database error returns a value, yet the savepoint is aborted: the
runtime finds it (RELEASE fails, runtime/invoke.py ``_cause``) and records nothing. One that
calls ``call_next`` twice gets MiddlewareMisuse and the handler's effects apply once. One
that raises Reject rejects, and the handler's writes before it are rolled back.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import msgpack
import pytest
from pydantic import BaseModel

from consumer import App, CallNext, Context, Reject
from consumer.middlewares import RateLimit
from tests.conftest import app_settings, eventually, read_topic, running

pytestmark = pytest.mark.integration


class Pay(BaseModel):
    id: str


async def _run(
    settings, topics, producer, pg, unique, base, install, **overrides: Any
) -> tuple[App, str, Any]:
    """An app whose handler inserts a row per message then (for id ``dup``) re-inserts a
    primary key (unique violation), with ``install(app)``'s middleware, fed three messages."""
    topic = await topics(base)
    table = f"mw_{base}_{unique}".replace("-", "_")
    await pg.execute(f"CREATE TABLE {table} (k text PRIMARY KEY)")
    app = App(f"g-{base}-{unique}", settings=app_settings(settings, max_attempts=1, **overrides))
    install(app)

    @app.handler(topic, schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> dict[str, str]:
        await ctx.db.execute(f"INSERT INTO {table} VALUES ($1)", p.id)
        if p.id == "dup":
            await ctx.db.execute(f"INSERT INTO {table} VALUES ($1)", p.id)  # 23505
        return {"ok": p.id}

    for i, key in enumerate(["a", "dup", "b"]):
        await producer.send_and_wait(topic, msgpack.packb({"id": key}), partition=i % 3)
    async with running(app) as worker:

        async def all_seen() -> bool:
            # Every record consumed and what it wrote to the outbox (a dead letter) published
            # by the worker's relay, which stops with the worker.
            pending = await pg.fetchval(
                "SELECT count(*) FROM dedup.outbox WHERE published_at IS NULL"
                " AND topic LIKE $1 || '%'",
                topic,
            )
            return worker.stats.consumed >= 3 and pending == 0

        await eventually(all_seen)
    return app, table, worker


async def _inbox(pg: asyncpg.Connection, app: App) -> dict[str, str]:
    rows = await pg.fetch(
        "SELECT key, status FROM dedup.inbox WHERE namespace = $1", f"{app.group}.handle"
    )
    return {r["key"]: r["status"] for r in rows}


@pytest.mark.parametrize("optimistic", [False, True])  # a savepoint each, or one for all
async def test_a_swallowed_database_error_records_no_success(
    settings, topics, producer, pg, unique, optimistic
):
    def install(app: App) -> None:
        @app.middleware
        async def swallow(call_next: CallNext, payload: BaseModel, ctx: Context) -> Any:
            try:
                return await call_next(payload)
            except asyncpg.UniqueViolationError:
                return {"ok": "swallowed"}  # hides the handler's failure: must not count

    app, table, worker = await _run(
        settings,
        topics,
        producer,
        pg,
        unique,
        f"swallow{int(optimistic)}",
        install,
        optimistic=optimistic,
    )
    rows = {r["k"] for r in await pg.fetch(f"SELECT k FROM {table}")}
    assert rows == {"a", "b"}  # the "dup" savepoint was rolled back, its first insert too
    assert await _inbox(pg, app) == {"a": "done", "b": "done"}  # nothing recorded for dup
    dead = await read_topic(settings, app.handlers[0].topics[0] + ".dlq", expect=1)
    assert [dict(d.headers)["x-reason"] for d in dead] == [b"failed"]
    assert worker.stats.by_outcome["applied"] == 2


async def test_call_next_twice_applies_once(settings, topics, producer, pg, unique):
    def install(app: App) -> None:
        @app.middleware
        async def twice(call_next: CallNext, payload: BaseModel, ctx: Context) -> Any:
            first = await call_next(payload)
            try:
                await call_next(payload)  # refused: the handler does not run again
            except RuntimeError:
                pass
            return first

    app, table, _ = await _run(settings, topics, producer, pg, unique, "twice", install)
    # With a second run, "a" and "b" would have failed their primary key (not applied).
    assert {r["k"] for r in await pg.fetch(f"SELECT k FROM {table}")} == {"a", "b"}
    assert await _inbox(pg, app) == {"a": "done", "b": "done"}


async def test_a_call_next_left_to_run_after_the_middleware_does_not_stall_the_partitions(
    settings, topics, producer, pg, unique
):
    # A middleware that fires the handler off in a task and returns (or a shielded call
    # that outlives it) would run the handler on the batch's connection after the
    # message's savepoint ended, concurrently with the batch's next statement: asyncpg's
    # "another operation is in progress" failed every batch as a whole, retried without
    # limit, and no partition ever moved. A call_next after its middleware returned is
    # refused (MiddlewareMisuse) before it touches ctx.db; the middleware's return value is
    # the recorded result, as for any middleware that returns without calling call_next.
    strays: list[asyncio.Future[Any]] = []

    def install(app: App) -> None:
        @app.middleware
        async def fire_and_forget(call_next: CallNext, payload: BaseModel, ctx: Context) -> Any:
            strays.append(asyncio.ensure_future(call_next(payload)))
            return {"queued": True}

    app, table, _ = await _run(settings, topics, producer, pg, unique, "stray", install)
    await asyncio.gather(*strays, return_exceptions=True)
    assert [type(f.exception()).__name__ for f in strays] == ["MiddlewareMisuse"] * 3
    assert await pg.fetch(f"SELECT k FROM {table}") == []  # never outside a savepoint
    assert await _inbox(pg, app) == {"a": "done", "dup": "done", "b": "done"}


async def test_a_middleware_reject_rolls_back_the_handler(settings, topics, producer, pg, unique):
    def install(app: App) -> None:
        @app.middleware
        async def audit(call_next: CallNext, payload: BaseModel, ctx: Context) -> Any:
            result = await call_next(payload)
            if getattr(payload, "id", "") == "b":
                raise Reject("audit refused b")  # after the handler's insert
            return result

    app, table, _ = await _run(settings, topics, producer, pg, unique, "reject", install)
    assert {r["k"] for r in await pg.fetch(f"SELECT k FROM {table}")} == {"a"}
    assert await _inbox(pg, app) == {"a": "done", "b": "rejected"}
    reasons = await pg.fetchval(
        "SELECT reason FROM dedup.inbox WHERE namespace = $1 AND key = 'b'", f"{app.group}.handle"
    )
    assert reasons == "audit refused b"


async def test_a_rate_limit_wait_cut_short_by_the_timeout_gives_its_token_back(
    settings, topics, producer, pg, unique
):
    # RateLimit(0.5/s, burst 1), handler timeout 1.5 s: the second message's first wait
    # (2 s) outlasts the timeout, a transient failure (docs/middleware.md), retried. The
    # retry must then find the token the cut-short wait never used: it runs after 0.5 s. The
    # token was kept, so each retry reserved another one and waited longer than the last:
    # every wait outlasted the timeout, the message never ran and was dead-lettered `failed`
    # (with six partitions against RateLimit(2), 3 of 36 messages applied, 33 dead-lettered).
    topic = await topics("mw-rate", partitions=1)
    group = f"g-rate-{unique}"
    table = f"mw_rate_{unique}"
    await pg.execute(f"CREATE TABLE {table} (k text)")
    s = app_settings(settings, max_attempts=4, retry_backoff_ms=10, retry_backoff_max_ms=20)
    app = App(group, settings=s)
    app.middleware(RateLimit(0.5, burst=1))

    @app.handler(topic, schema=Pay, key=lambda p: p.id, timeout_s=1.5)
    async def handle(p: Pay, ctx: Context) -> None:
        await ctx.db.execute(f"INSERT INTO {table} VALUES ($1)", p.id)

    try:
        for key in ("first", "second"):
            await producer.send_and_wait(topic, msgpack.packb({"id": key}), partition=0)
        async with running(app) as worker:

            async def settled() -> bool:
                return worker.stats.consumed >= 2

            await eventually(settled, timeout_s=60)
        applied = sorted(r["k"] for r in await pg.fetch(f"SELECT k FROM {table}"))
        assert (applied, worker.stats.by_outcome["failed"]) == (["first", "second"], 0)
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {table}")
