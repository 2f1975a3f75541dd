"""Retries that do not block (``retry="topics"``, consumer/runtime/retry_topics.py), on real
Kafka, Redis and PostgreSQL.

Every effect is a row in a table without a unique constraint, so a second application shows.
Handlers in this process are synchronised with the test by asyncio events (the worker runs in
the test's event loop); the crash tests run the worker as a process that kills itself at a
fault point (tests/integration/retry_app.py).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from consumer import App, Context, Retry, Settings
from consumer.outbox.envelopes import unpack_headers
from tests.conftest import ROOT, app_settings, eventually, header_map, read_topic, running
from tests.integration.dedup_support import Pay, cleanup, inbox, outbox, send, stored_offset
from tests.integration.retry_app import build_app

pytestmark = pytest.mark.integration


@pytest.fixture
async def table(settings, pg, unique) -> AsyncIterator[str]:
    name = f"eff_{unique}"
    await pg.execute(f"CREATE TABLE {name} (seq bigserial, k text, v text)")
    await pg.execute(f"CREATE TABLE gate_{unique} (open int)")
    try:
        yield name
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {name}")
        await pg.execute(f"DROP TABLE IF EXISTS gate_{unique}")
        await cleanup(pg, unique, settings.redis_url)


def fast(settings: Settings, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "retry_topic_backoff_ms": 100,
        "retry_topic_backoff_multiplier": 1.0,
        "lease_wait_ms": 2_000,
    }
    base.update(overrides)
    return app_settings(settings, **base)


async def rows(pg: Any, table: str) -> list[tuple[str, str]]:
    """(key, value) in the order the rows were inserted."""
    return [(r["k"], r["v"]) for r in await pg.fetch(f"SELECT k, v FROM {table} ORDER BY seq")]


async def test_retried_twice_then_applied_once_after_the_later_messages(
    settings, topics, producer, pg, table, unique
):
    topic = await topics("rt", partitions=1)  # .retry is created by the worker
    third_run, release = asyncio.Event(), asyncio.Event()
    s = fast(settings)
    app = App(f"g-{unique}", settings=s)

    @app.handler(topic, schema=Pay, key=lambda p: p.id, retry="topics")
    async def handle(p: Pay, ctx: Context) -> str:
        if p.id == "slow":
            if ctx.attempt < 3:
                raise Retry(reason="dependency down")
            third_run.set()
            await release.wait()  # the test looks at the stores while this run is open
        await ctx.db.execute(f"INSERT INTO {table} (k, v) VALUES ($1, $2)", p.id, str(ctx.attempt))
        return "ok"

    async with running(app, s):
        for k in ("slow", "a", "b"):
            await send(producer, topic, {"id": k})
        await asyncio.wait_for(third_run.wait(), 60)
        # Two failures so far: the partition moved on, nothing is recorded for the key.
        assert await rows(pg, table) == [("a", "1"), ("b", "1")]
        assert "slow" not in await inbox(pg, f"g-{unique}.handle")
        retried = await read_topic(settings, topic + ".retry")
        assert [header_map(r)["x-retry-attempt"] for r in retried] == ["2", "3"]
        assert {header_map(r)["x-retry-origin"] for r in retried} == {f"{topic}/0/0"}
        assert await stored_offset(pg, f"g-{unique}", topic, 0) == 3
        release.set()

        async def applied() -> bool:
            return len(await rows(pg, table)) == 3

        await eventually(applied, 60)
    assert await rows(pg, table) == [("a", "1"), ("b", "1"), ("slow", "3")]
    assert inbox_status(await inbox(pg, f"g-{unique}.handle")) == {
        "slow": "done",
        "a": "done",
        "b": "done",
    }
    # The retry topic's own position covers both retry records: nothing waits there.
    assert await stored_offset(pg, f"g-{unique}", topic + ".retry", 0) == 2


def inbox_status(rows_: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {k: r["status"] for k, r in rows_.items()}


async def test_exhausted_retries_dead_letter_as_failed_and_leave_the_key_free(
    settings, topics, producer, pg, table, unique
):
    topic = await topics("rx", partitions=1)
    s = fast(settings)
    app = App(f"g-{unique}", settings=s)

    @app.handler(topic, schema=Pay, key=lambda p: p.id, retry="topics", max_attempts=3)
    async def handle(p: Pay, ctx: Context) -> str:
        if p.cents == 1:
            raise Retry(reason="still down")
        await ctx.db.execute(f"INSERT INTO {table} (k, v) VALUES ($1, $2)", p.id, str(p.cents))
        return "ok"

    async with running(app, s):
        await send(producer, topic, {"id": "k1", "cents": 1}, headers={"x-trace": b"\xff\x00"})
        dead = await read_topic(settings, topic + ".dlq", expect=1)
        h = header_map(dead[0])
        assert h["x-reason"] == "failed"
        assert h["x-detail"].startswith("attempts_exhausted (3)")
        assert h["x-retry-origin"] == f"{topic}/0/0"
        assert h["x-source"].startswith(topic + ".retry/")
        assert dead[0].value == (await read_topic(settings, topic))[0].value  # original bytes
        # The binary header travelled exactly through both hops.
        assert ("x-trace", b"\xff\x00") in unpack_headers(h["x-original-headers"])
        assert "k1" not in await inbox(pg, f"g-{unique}.handle")
        assert len(await read_topic(settings, topic + ".retry")) == 2

        # Not burned: a later copy of the key (now processable) is applied.
        await send(producer, topic, {"id": "k1", "cents": 2})

        async def applied() -> bool:
            return len(await rows(pg, table)) == 1

        await eventually(applied, 60)
    assert await rows(pg, table) == [("k1", "2")]


async def test_a_fresh_copy_while_one_is_in_retry_applies_once(
    settings, topics, producer, pg, table, unique
):
    """k-same: the fresh copy has the same payload (one application, the other copy a
    duplicate); k-other: another payload (one application, the other copy a conflict in
    ``<topic>.conflicts``). Which copy applies depends on timing; the counts do not."""
    topic = await topics("rf", partitions=1)
    s = fast(settings, retry_topic_backoff_ms=1_500)
    app = App(f"g-{unique}", settings=s)

    @app.handler(topic, schema=Pay, key=lambda p: p.id, retry="topics")
    async def handle(p: Pay, ctx: Context) -> str:
        if ctx.message.topic == topic and ctx.message.offset < 2:
            raise Retry(reason="first copies fail once")
        await ctx.db.execute(f"INSERT INTO {table} (k, v) VALUES ($1, $2)", p.id, str(p.cents))
        return "ok"

    async with running(app, s):
        await send(producer, topic, {"id": "k-same", "cents": 1})
        await send(producer, topic, {"id": "k-other", "cents": 1})
        await read_topic(settings, topic + ".retry", expect=2)  # both in retry
        await send(producer, topic, {"id": "k-same", "cents": 1})
        await send(producer, topic, {"id": "k-other", "cents": 7})

        async def settled() -> bool:
            retry_end = await stored_offset(pg, f"g-{unique}", topic + ".retry", 0)
            return retry_end == 2 and await stored_offset(pg, f"g-{unique}", topic, 0) == 4

        await eventually(settled, 60)
    applied = await rows(pg, table)
    assert sorted(k for k, _ in applied) == ["k-other", "k-same"]
    conflicts = await read_topic(settings, topic + ".conflicts", expect=1)
    assert [header_map(c)["x-idempotency-key"] for c in conflicts] == ["k-other"]
    assert await read_topic(settings, topic + ".dlq") == []


@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
async def test_crash_around_the_retry_commit_loses_nothing_applies_once(
    settings, topics, producer, pg, table, unique, point
):
    """SIGKILL-like exit (137) at the fault point of the batch that writes the retry row:
    before its commit (nothing written: the record is read again and diverted again) or
    after (the row and the position committed, the relay had not sent the row)."""
    topic = await topics("rc", partitions=1)
    group, gate = f"g-{unique}", f"gate_{unique}"
    await send(producer, topic, {"id": "k1"})
    env = {
        **os.environ,
        "DEDUP_TEST_FAULTS": f"{point}=1",
        "CONSUMER_RELAY_ENABLED": "false",
        "CONSUMER_FETCH_TIMEOUT_MS": "50",
        "CONSUMER_RETRY_TOPIC_BACKOFF_MS": "100",
        "PYTHONPATH": str(ROOT),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.retry_app",
        group,
        topic,
        table,
        gate,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 137, stderr.decode()[-2000:]
    assert f"fault point {point}".encode() in stderr

    written = await outbox(pg, topic + ".retry")
    if point == "before_commit":
        assert written == []
        assert await stored_offset(pg, group, topic, 0) == -1
    else:
        assert [r["headers"]["x-retry-attempt"] for r in written] == ["2"]
        assert await stored_offset(pg, group, topic, 0) == 1
    assert "k1" not in await inbox(pg, f"{group}.handle")
    assert await rows(pg, table) == []

    s = fast(settings, max_attempts=50)  # the gate opens long before that
    app = build_app(group, topic, table, gate)
    app.settings = s
    async with running(app, s):
        first = await read_topic(settings, topic + ".retry", expect=1)
        await pg.execute(f"INSERT INTO {gate} VALUES (1)")

        async def applied() -> bool:
            return len(await rows(pg, table)) == 1

        await eventually(applied, 60)
    assert [k for k, _ in await rows(pg, table)] == ["k1"]
    assert await stored_offset(pg, group, topic, 0) == 1
    assert inbox_status(await inbox(pg, f"{group}.handle")) == {"k1": "done"}
    # One diversion only: the crashed run's retry row was either never committed or sent
    # once by the restarted worker's relay; later retries (gate closed) are later attempts.
    retried = await read_topic(settings, topic + ".retry")
    attempts = [header_map(r)["x-retry-attempt"] for r in retried]
    assert header_map(first[0])["x-retry-attempt"] == "2"
    assert attempts == [str(n) for n in range(2, 2 + len(attempts))]
