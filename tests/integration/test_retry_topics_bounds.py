"""What a record of ``<topic>.retry`` says about itself cannot hold its partition for long.

A record on a retry topic is read from Kafka, and Kafka does not know who wrote it: another
producer, a worker whose clock is far off, a hand-made record. Its ``x-retry-due-ms`` is
therefore bounded by the record's own Kafka timestamp: it is processed at most the cap
(``max(CONSUMER_RETRY_TOPIC_BACKOFF_MAX_MS, the longest Retry(delay_s))``, the furthest due
time the framework ever writes) after it was written, and a record whose timestamp is itself
further ahead than the cap is due at once (consumer/runtime/retry_topics.py, ``hold_back``).
Real Kafka, Redis and PostgreSQL; the worker runs in the test's event loop.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgpack
import pytest

from consumer import App, Context, Retry
from consumer.errors import MAX_RETRY_DELAY_S
from consumer.runtime import retry_topics
from tests.conftest import app_settings, eventually, header_map, read_topic, running
from tests.integration.dedup_support import Pay, cleanup, inbox, send

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


@pytest.fixture
async def table(settings, pg, unique) -> AsyncIterator[str]:
    name = f"eff_{unique}"
    await pg.execute(f"CREATE TABLE {name} (seq bigserial, k text, at_ms bigint)")
    try:
        yield name
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {name}")
        await cleanup(pg, unique, settings.redis_url)


def _app(group: str, topic: str, table: str, s: Any) -> App:
    app = App(group, settings=s)

    @app.handler(topic, schema=Pay, key=lambda p: p.id, retry="topics")
    async def handle(p: Pay, ctx: Context) -> str:
        await ctx.db.execute(
            f"INSERT INTO {table} (k, at_ms) VALUES ($1, $2)", p.id, int(time.time() * 1000)
        )
        return "ok"

    return app


async def _forged(producer: Any, topic: str, key: str, due_ms: int, written_ms: int) -> None:
    """A record of ``topic`` (a retry topic) not written by the framework."""
    await producer.send_and_wait(
        topic,
        msgpack.packb({"id": key}),
        partition=0,
        timestamp_ms=written_ms,
        headers=[("x-retry-attempt", b"2"), ("x-retry-due-ms", str(due_ms).encode())],
    )


async def _applied(pg: Any, table: str) -> dict[str, int]:
    return {r["k"]: r["at_ms"] for r in await pg.fetch(f"SELECT k, at_ms FROM {table}")}


async def test_a_retry_record_due_in_a_day_runs_once_the_cap_after_its_write_has_passed(
    settings, topics, producer, pg, table, unique
):
    """Written (by its timestamp) longer than the cap ago, due in a day: due now. Before the
    bound, its partition was paused for the cap, then again, for a day."""
    topic = await topics("rbd", partitions=1)
    s = app_settings(settings, retry_topic_backoff_max_ms=1_000)
    cap_ms = int(MAX_RETRY_DELAY_S * 1000)
    async with running(_app(f"g-{unique}", topic, table, s), s):
        now_ms = int(time.time() * 1000)
        await _forged(producer, topic + ".retry", "far", now_ms + DAY_MS, now_ms - cap_ms - 60_000)
        await send(producer, topic, {"id": "plain"})

        async def both() -> bool:
            return len(await _applied(pg, table)) == 2

        await eventually(both, 30)
    assert {k: r["status"] for k, r in (await inbox(pg, f"g-{unique}.handle")).items()} == {
        "far": "done",
        "plain": "done",
    }


async def test_a_fresh_retry_record_due_far_away_waits_the_cap_then_runs(
    settings, topics, producer, pg, table, unique, monkeypatch
):
    """Written now, due in a day: processed the cap after it was written (the cap made 2 s
    here), not paused for the cap again and again."""
    monkeypatch.setattr(retry_topics, "MAX_RETRY_DELAY_S", 2.0)
    topic = await topics("rbf", partitions=1)
    s = app_settings(settings, retry_topic_backoff_max_ms=2_000)
    async with running(_app(f"g-{unique}", topic, table, s), s):
        written_ms = int(time.time() * 1000)
        await _forged(producer, topic + ".retry", "far", written_ms + DAY_MS, written_ms)

        async def ran() -> bool:
            return "far" in await _applied(pg, table)

        await eventually(ran, 20)
    at_ms = (await _applied(pg, table))["far"]
    assert 2_000 - 250 <= at_ms - written_ms < 15_000  # not before its bound, soon after it


async def test_a_retry_record_stamped_days_ahead_is_due_at_once(
    settings, topics, producer, pg, table, unique
):
    """Timestamp and due time both two days ahead (a producer clock far off): the timestamp
    cannot bound anything, so the record is due now rather than in two days."""
    topic = await topics("rba", partitions=1)
    s = app_settings(settings)
    async with running(_app(f"g-{unique}", topic, table, s), s):
        ahead_ms = int(time.time() * 1000) + 2 * DAY_MS
        await _forged(producer, topic + ".retry", "ahead", ahead_ms, ahead_ms)

        async def ran() -> bool:
            return "ahead" in await _applied(pg, table)

        await eventually(ran, 30)


async def test_a_huge_attempt_header_and_a_deadlock_retry_in_place_then_apply(
    settings, topics, producer, pg, table, unique
):
    """``x-retry-attempt: 10**30`` on a record whose first run meets a deadlock (contention:
    retried in place with the in-place back-off of that attempt). Before the exponent was
    capped, ``2 ** (10**30 - 1)`` blocked the worker's event loop for good."""
    topic = await topics("rbh", partitions=1)
    s = app_settings(settings, retry_backoff_ms=50, retry_backoff_max_ms=200)
    app = App(f"g-{unique}", settings=s)
    runs: list[int] = []

    @app.handler(topic, schema=Pay, key=lambda p: p.id, retry="topics")
    async def handle(p: Pay, ctx: Context) -> str:
        runs.append(ctx.attempt)
        if len(runs) == 1:
            raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
        await ctx.db.execute(f"INSERT INTO {table} (k, at_ms) VALUES ($1, 0)", p.id)
        return "ok"

    async with running(app, s):
        now_ms = int(time.time() * 1000)
        await producer.send_and_wait(
            topic + ".retry",
            msgpack.packb({"id": "huge"}),
            partition=0,
            headers=[("x-retry-attempt", str(10**30).encode()), ("x-retry-due-ms", b"0")],
            timestamp_ms=now_ms,
        )

        async def ran() -> bool:
            return "huge" in await _applied(pg, table)

        await eventually(ran, 30)
    assert runs == [10**30, 10**30]  # the deadlock used up no attempt


async def test_a_retry_record_with_a_null_due_header_is_due_now(
    settings, topics, producer, pg, table, unique
):
    """Kafka allows a header without a value (aiokafka reads it as None): unreadable, so
    due now, like any unreadable due time; the fetch loop goes on."""
    topic = await topics("rbn", partitions=1)
    s = app_settings(settings)
    async with running(_app(f"g-{unique}", topic, table, s), s) as worker:
        await producer.send_and_wait(
            topic + ".retry",
            msgpack.packb({"id": "null"}),
            partition=0,
            headers=[("x-retry-attempt", None), ("x-retry-due-ms", None)],
        )
        await send(producer, topic, {"id": "after"})

        async def both() -> bool:
            return len(await _applied(pg, table)) == 2

        await eventually(both, 30)
        assert not worker.stop.is_set()


async def test_a_retry_record_with_an_unstorable_origin_is_retried_again(
    settings, topics, producer, pg, unique
):
    """``x-retry-origin`` is copied into the next retry row's headers (jsonb text): one that
    PostgreSQL cannot store (a NUL) must not turn a transient failure into an ``unstorable``
    dead letter; the next hop names this record as its origin instead."""
    topic = await topics("rbo", partitions=1)
    s = app_settings(settings, retry_topic_backoff_ms=100, retry_topic_backoff_multiplier=1.0)
    app = App(f"g-{unique}", settings=s)
    attempts: list[int] = []

    @app.handler(topic, schema=Pay, key=lambda p: p.id, retry="topics", max_attempts=5)
    async def handle(p: Pay, ctx: Context) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise Retry(reason="down")
        return "ok"

    async with running(app, s):
        await producer.send_and_wait(
            topic + ".retry",
            msgpack.packb({"id": "o"}),
            partition=0,
            headers=[
                ("x-retry-attempt", b"2"),
                ("x-retry-due-ms", b"0"),
                ("x-retry-origin", b"a\x00b"),
            ],
        )

        async def done() -> bool:
            return (await inbox(pg, f"g-{unique}.handle")).get("o", {}).get("status") == "done"

        await eventually(done, 30)
    assert attempts == [2, 3]
    [_, hop] = await read_topic(settings, topic + ".retry", expect=2)
    assert header_map(hop)["x-retry-origin"] == f"{topic}.retry/0/0"
    assert await read_topic(settings, topic + ".dlq") == []
