"""Exactly once under faults: crashes around the commit, Redis losing keys or gone, racing
consumers, zombies. Real Kafka, Redis and PostgreSQL; effects tables without unique
constraints, so a second effect would be a second row.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgpack
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from consumer import App, Context, Settings
from consumer.constants import done_key
from consumer.db import offsets
from consumer.db.pool import create_pool
from consumer.dedup.leases import RedisLeases
from consumer.message import Message
from consumer.runtime.batch import BatchProcessor, pg_transaction
from consumer.runtime.outcomes import Outcome
from consumer.testing import faults
from tests.conftest import ROOT, app_settings, eventually, running
from tests.integration.crash_app import build_app
from tests.integration.dedup_support import (
    Pay,
    Spy,
    cleanup,
    db_epoch,
    effects,
    inbox,
    redis_keys,
    send,
    stored_offset,
    wait_offset,
)

pytestmark = pytest.mark.integration

DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.fixture
async def table(settings, pg, unique) -> AsyncIterator[str]:
    name = f"eff_{unique}"
    await pg.execute(f"CREATE TABLE {name} (k text, v text)")
    try:
        yield name
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {name}")
        await cleanup(pg, unique, settings.redis_url)


@pytest.fixture(autouse=True)
def _no_leftover_fault_hooks() -> Any:
    yield
    faults.clear()


def fast(settings: Settings, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "relay_enabled": False,
        "retry_backoff_ms": 20,
        "retry_backoff_max_ms": 200,
        "lease_wait_ms": 2_000,
    }
    base.update(overrides)
    return app_settings(settings, **base)


def counting_app(group: str, topic: str, table: str, settings: Settings, delay_s: float = 0.0):
    """One effect row per run of the handler; ``delay_s`` widens race windows."""
    app = App(group, settings=settings)

    @app.handler(topic, schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> int:
        await ctx.db.execute(f"INSERT INTO {table} (k, v) VALUES ($1, $2)", p.id, str(p.cents))
        if delay_s:
            await asyncio.sleep(delay_s)
        return p.cents

    return app


def assert_once_each(rows: list[str], keys: list[str]) -> None:
    counts = Counter(rows)
    assert sorted(counts) == sorted(keys)
    assert {k: n for k, n in counts.items() if n != 1} == {}


# ---------------------------------------------------------------- crash around the commit


async def _kafka_committed(settings: Settings, group: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        found = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in found.items() if meta.offset >= 0}


@pytest.mark.slow
async def test_sigkill_between_db_commit_and_kafka_commit_has_no_second_effect(
    settings, topics, producer, pg, table, unique
):
    topic = await topics("crash", partitions=1)
    group = f"g-{unique}"
    keys = [f"k{i}" for i in range(5)]
    for k in keys:
        await send(producer, topic, {"id": k})

    env = {
        **os.environ,
        "DEDUP_TEST_FAULTS": "after_commit=1",
        "CONSUMER_RELAY_ENABLED": "false",
        "CONSUMER_FETCH_TIMEOUT_MS": "50",
        "CONSUMER_SESSION_TIMEOUT_MS": "6000",
        "CONSUMER_HEARTBEAT_INTERVAL_MS": "1000",
        "CONSUMER_MAX_POLL_INTERVAL_MS": "8000",
        "PYTHONPATH": str(ROOT),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.crash_app",
        group,
        topic,
        table,
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
    assert b"fault point after_commit" in stderr

    # The database committed the first batch; Kafka never heard of it.
    committed_db = await stored_offset(pg, group, topic, 0)
    assert committed_db >= 1
    assert (await _kafka_committed(settings, group)).get(0, 0) < committed_db
    applied_before = await effects(pg, table)
    assert len(applied_before) == committed_db

    # Restart (no faults) and deliver every key once more, as a retrying client would.
    s = fast(
        settings, session_timeout_ms=6000, heartbeat_interval_ms=1000, max_poll_interval_ms=8000
    )
    app = build_app(group, topic, table)
    app.settings = s
    async with running(app, s) as worker:
        spy = Spy(worker)
        last = 0
        for k in keys:
            last = await send(producer, topic, {"id": k})
        await wait_offset(pg, group, topic, 0, last + 1, timeout_s=60)

    assert_once_each(await effects(pg, table), keys)
    # The new copies are duplicates; a record may also come round again (fetched before the
    # seek to the stored position) and is then skipped, never handled twice.
    decided = [(h.message.offset, h.outcome) for h in spy.handled if h.outcome != Outcome.SKIPPED]
    assert sorted(o for o, outcome in decided if outcome != Outcome.DUPLICATE) == list(
        range(committed_db, len(keys))
    )  # only the originals the crashed worker never reached are applied
    assert sorted(o for o, outcome in decided if outcome == Outcome.DUPLICATE) == list(
        range(len(keys), last + 1)
    )
    # Replayed records below the stored position were never handed to the handler again.
    rows = await pg.fetch(f"SELECT k, v FROM {table}")
    assert {r["v"] for r in rows} == {"1"}
    assert (await _kafka_committed(settings, group)).get(0) == last + 1


@pytest.mark.parametrize("point", ["mid_handler", "before_commit", "after_commit"])
async def test_in_process_fault_at_each_point_has_one_effect(
    settings, topics, producer, pg, table, unique, point
):
    topic = await topics("fault")
    group = f"g-{unique}"
    fired: list[str] = []

    async def fail_once(name: str) -> None:
        if not fired:
            fired.append(name)
            raise ConnectionResetError(f"injected at {name}")

    faults.install(point, fail_once)
    app = counting_app(group, topic, table, fast(settings))
    keys = [f"k{i}" for i in range(6)]
    async with running(app) as worker:
        spy = Spy(worker)
        last = 0
        for k in keys:
            last = await send(producer, topic, {"id": k})
        await wait_offset(pg, group, topic, 0, last + 1)

    assert fired == [point]
    assert_once_each(await effects(pg, table), keys)
    assert len(spy.retries) >= 1
    records = await inbox(pg, f"{group}.handle")
    assert {k: r["status"] for k, r in records.items()} == dict.fromkeys(keys, "done")


# ---------------------------------------------------------------- Redis loses keys / is gone


async def test_redis_keys_deleted_mid_run_have_no_second_effect(
    settings, topics, producer, pg, table, unique
):
    topic = await topics("flush")
    group = f"g-{unique}"
    app = counting_app(group, topic, table, fast(settings))
    ns = f"{group}.handle"
    keys = [f"k{i}" for i in range(30)]
    redis = RedisLeases(settings.redis_url)
    names = redis_keys(ns, keys, await db_epoch(pg))
    deleted = 0
    stop = asyncio.Event()

    async def forget() -> None:
        # Only this test's namespace: the Redis is shared (never FLUSHALL it).
        nonlocal deleted
        while not stop.is_set():
            deleted += await redis.redis.delete(*names)
            await asyncio.sleep(0.005)

    try:
        async with running(app) as worker:
            spy = Spy(worker)
            flusher = asyncio.create_task(forget())
            last: dict[int, int] = {}
            for copy in range(3):
                for i, k in enumerate(keys):
                    part = (i + copy) % 3
                    last[part] = await send(producer, topic, {"id": k, "cents": 1}, partition=part)
            for part, off in last.items():
                await wait_offset(pg, group, topic, part, off + 1)
            stop.set()
            await flusher
    finally:
        stop.set()
        await redis.close()

    assert deleted > 0
    assert_once_each(await effects(pg, table), keys)
    counts = Counter(h.outcome for h in spy.handled)
    assert counts[Outcome.APPLIED] == len(keys)
    assert counts[Outcome.DUPLICATE] == 2 * len(keys)
    assert counts[Outcome.CONFLICT] == 0


async def test_redis_unreachable_still_exactly_once_and_flagged(
    settings, topics, producer, pg, table, unique
):
    topic = await topics("noredis")
    group = f"g-{unique}"
    app = counting_app(group, topic, table, fast(settings, redis_url=DEAD_REDIS))
    keys = [f"k{i}" for i in range(10)]
    async with running(app) as worker:
        spy = Spy(worker)
        last: dict[int, int] = {}
        for copy in range(2):
            for i, k in enumerate(keys):
                part = (i + copy) % 3
                last[part] = await send(producer, topic, {"id": k}, partition=part)
        # And one reused key with another payload: a conflict, decided by PostgreSQL alone.
        last[0] = await send(producer, topic, {"id": "k0", "cents": 99}, partition=0)
        for part, off in last.items():
            await wait_offset(pg, group, topic, part, off + 1)
        assert worker.processor is not None
        assert worker.processor.redis_degraded
        assert worker.processor.redis_failures >= 1
        assert worker.stats.redis_degraded

    assert_once_each(await effects(pg, table), keys)
    counts = Counter(h.outcome for h in spy.handled)
    assert (counts[Outcome.APPLIED], counts[Outcome.DUPLICATE], counts[Outcome.CONFLICT]) == (
        len(keys),
        len(keys),
        1,
    )


async def test_back_to_redis_when_it_answers_again(settings, pg, table, unique):
    app = counting_app(f"g-{unique}", f"t-{unique}", table, fast(settings, redis_retry_s=0.05))
    pool = await create_pool(settings.postgres_dsn, max_size=2)
    dead, live = RedisLeases(DEAD_REDIS), RedisLeases(settings.redis_url)
    processor = BatchProcessor(app, app.settings, dead, "tok", lambda: pg_transaction(pool))
    ns = f"g-{unique}.handle"
    try:
        r1 = await processor.process(
            [Message(f"t-{unique}", 0, 0, None, msgpack.packb({"id": "a"}))]
        )
        assert r1.redis_degraded and [h.outcome for h in r1.handled] == [Outcome.APPLIED]
        processor.leases = live  # Redis is back

        async def recovered() -> bool:
            return not processor.redis_degraded

        await eventually(recovered, timeout_s=5)
        r2 = await processor.process(
            [Message(f"t-{unique}", 0, 1, None, msgpack.packb({"id": "b"}))]
        )
        assert not r2.redis_degraded and [h.outcome for h in r2.handled] == [Outcome.APPLIED]
        # The marker of the message handled while degraded was never written; the next one's was.
        assert await live.redis.get(done_key(ns, "a", "")) is None
        assert await live.redis.get(done_key(ns, "b", "")) is not None
    finally:
        await live.redis.delete(*redis_keys(ns, ["a", "b"], ""))
        await dead.close()
        await live.close()
        await pool.close()


# ---------------------------------------------------------------- two consumers race


@pytest.mark.parametrize("redis_url", ["live", DEAD_REDIS], ids=["redis", "postgres-only"])
async def test_two_workers_racing_on_one_key_apply_it_once(
    settings, topics, producer, pg, table, unique, redis_url
):
    topic = await topics("race", partitions=2)
    group = f"g-{unique}"
    s = fast(settings, redis_url=settings.redis_url if redis_url == "live" else redis_url)
    keys = [f"k{i}" for i in range(15)]
    app_a = counting_app(group, topic, table, s, delay_s=0.02)
    app_b = counting_app(group, topic, table, s, delay_s=0.02)
    async with running(app_a, s, worker_id=1) as wa, running(app_b, s, worker_id=2) as wb:

        async def split() -> bool:
            assert wa.consumer is not None and wb.consumer is not None
            return len(wa.consumer.assignment()) == 1 and len(wb.consumer.assignment()) == 1

        await eventually(split, timeout_s=60)
        spies = [Spy(wa), Spy(wb)]
        last = [0, 0]
        for k in keys:  # the same key on both partitions, back to back
            for part in (0, 1):
                last[part] = await send(producer, topic, {"id": k, "cents": 5}, partition=part)
        for part in (0, 1):
            await wait_offset(pg, group, topic, part, last[part] + 1, timeout_s=60)

    assert_once_each(await effects(pg, table), keys)
    per_key: dict[str, list[Outcome]] = {}
    for spy in spies:
        for h in spy.handled:
            per_key.setdefault(h.key, []).append(h.outcome)
    assert {k: sorted(v) for k, v in per_key.items()} == {
        k: [Outcome.APPLIED, Outcome.DUPLICATE] for k in keys
    }


# ---------------------------------------------------------------- zombies


async def test_stored_offsets_never_move_back(pg, settings, unique):
    group, topic = f"g-{unique}", f"t-{unique}"
    text, args = offsets.lock(group, topic, 0)
    assert await pg.fetchval(text, *args) == -1
    for position, expected in [(10, 10), (5, 10), (10, 10), (11, 11), (0, 11)]:
        text, args = offsets.advance(group, topic, 0, position)
        await pg.execute(text, *args)
        assert await stored_offset(pg, group, topic, 0) == expected
    text, args = offsets.lock(group, topic, 0)
    assert await pg.fetchval(text, *args) == 11  # taking the lock does not move it either
    await pg.execute("DELETE FROM dedup.offsets WHERE group_id = $1", group)


async def test_zombie_batch_waits_for_the_new_owner_and_skips_what_it_did(
    settings, pg, table, unique
):
    group, topic = f"g-{unique}", f"t-{unique}"
    app = counting_app(group, topic, table, fast(settings))
    pool = await create_pool(settings.postgres_dsn, max_size=2)
    leases = RedisLeases(settings.redis_url)
    records = [Message(topic, 0, o, None, msgpack.packb({"id": f"z{o}"})) for o in range(4)]
    new_owner = await asyncpg.connect(settings.postgres_dsn)
    try:
        # The new owner holds the partition's position row inside its open transaction...
        tx = new_owner.transaction()
        await tx.start()
        text, args = offsets.lock(group, topic, 0)
        await new_owner.fetchval(text, *args)
        zombie = BatchProcessor(
            app, app.settings, leases, "zombie-" + uuid.uuid4().hex, lambda: pg_transaction(pool)
        )
        task = asyncio.create_task(zombie.process(records))

        async def zombie_blocked() -> bool:
            waiting = await pg.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))",
                new_owner.get_server_pid(),
            )
            return bool(waiting)

        await eventually(zombie_blocked, timeout_s=10)
        assert not task.done()
        # ... and commits having handled the records (its own effects happened then).
        text, args = offsets.advance(group, topic, 0, 4)
        await new_owner.execute(text, *args)
        for r in records:
            await new_owner.execute(
                f"INSERT INTO {table} (k, v) VALUES ($1, 'owner')", f"z{r.offset}"
            )
        await tx.commit()
        result = await asyncio.wait_for(task, 10)
    finally:
        await new_owner.close()
        await leases.close()
        await pool.close()

    assert [h.outcome for h in result.handled] == [Outcome.SKIPPED] * 4
    assert result.next_offset is None
    assert_once_each(await effects(pg, table), [f"z{o}" for o in range(4)])
    assert await stored_offset(pg, group, topic, 0) == 4
