"""The 'failed' outcome (transient failures past max_attempts) leaves the key free.

Covers the edges of that path not covered elsewhere: copies of the key in the same batch
(same payload, a reply request, a different payload) share the dead letter; nothing is left
in the inbox, no Redis lease and no done marker remain; a later copy runs the handler; and a
claimer on another partition that blocked on the failed run's uncommitted claim runs the
handler once that claim is undone, instead of reading a record that never existed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from consumer import App, Context
from consumer.dedup.leases import RedisLeases
from consumer.runtime.outcomes import Outcome
from tests.conftest import eventually
from tests.integration.dedup_support import (
    Pay,
    db_epoch,
    direct_env,
    direct_processor,
    inbox,
    outbox,
    record,
    redis_keys,
    stored_offset,
)

pytestmark = pytest.mark.integration

FAILED, APPLIED, DUPLICATE = Outcome.FAILED, Outcome.APPLIED, Outcome.DUPLICATE


@pytest.fixture
async def env(settings, pg, unique) -> AsyncIterator[dict[str, Any]]:
    async with direct_env(
        settings,
        pg,
        unique,
        "failed",
        pool_size=4,
        app_name=f"failed-{unique}",
        clean_redis=True,
        max_attempts=1,
        lease_wait_ms=0,
    ) as e:
        yield e


async def test_failed_copies_in_one_batch_share_the_dead_letter_and_leave_nothing(
    env, pg, settings
):
    app = App(env["group"], settings=env["settings"])
    calls: list[int] = []
    healthy = False

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        calls.append(ctx.message.offset)
        await ctx.db.execute("SELECT 1")
        ctx.publish(env["topic"] + ".out", {"id": p.id})
        if not healthy:
            raise TimeoutError("upstream down")
        return {"ok": p.cents}

    leases = RedisLeases(settings.redis_url, epoch=await db_epoch(pg))
    processor = direct_processor(app, env, leases, "tok-a")
    topic, ns = env["topic"], f"{env['group']}.handle"
    replies = f"replies-{env['group']}"
    try:
        batch = [
            record(topic, 0, {"id": "k", "cents": 1}),
            record(topic, 1, {"id": "k", "cents": 1}, headers={"reply-to": replies.encode()}),
            record(topic, 2, {"id": "k", "cents": 2}),  # another payload, same key
            record(topic, 3, {"id": "other", "cents": 1}),
        ]
        r1 = await processor.process(batch)
        assert r1.retry_offset is None
        assert [h.outcome for h in r1.handled] == [FAILED, FAILED, FAILED, FAILED]
        assert calls == [0, 3]  # copies of a failed key do not run again in the batch
        assert await stored_offset(pg, env["group"], topic, 0) == 4
        assert await inbox(pg, ns) == {}
        dlq = await outbox(pg, topic + ".dlq")
        assert [d["headers"]["x-source"] for d in dlq] == [f"{topic}/0/{o}" for o in range(4)]
        assert all(d["headers"]["x-reason"] == "failed" for d in dlq)
        assert await outbox(pg, topic + ".out") == []  # the run's publishes rolled back
        assert await outbox(pg, replies) == []
        names = redis_keys(ns, ["k", "other"], leases.epoch)
        assert await leases.redis.exists(*names) == 0  # no lease left, no done marker

        healthy = True
        r2 = await processor.process(
            [
                record(topic, 4, {"id": "k", "cents": 2}),
                record(topic, 5, {"id": "k", "cents": 2}, headers={"reply-to": replies.encode()}),
            ]
        )
        assert [h.outcome for h in r2.handled] == [APPLIED, DUPLICATE]
        rec = (await inbox(pg, ns))["k"]
        assert (rec["status"], rec["result"]) == ("done", {"ok": 2})
        assert len(await outbox(pg, replies)) == 1
    finally:
        await leases.close()


async def test_claimer_blocked_on_a_failed_runs_claim_runs_the_handler(env, pg):
    # Two workers without Redis (the inbox alone is the fence): A's run of key k is slow and
    # then fails for good; B, on another partition, blocks on A's uncommitted claim.
    app = App(env["group"], settings=env["settings"])
    started, release = asyncio.Event(), asyncio.Event()
    calls: list[int] = []

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        calls.append(ctx.message.partition)
        await ctx.db.execute("SELECT 1")
        if ctx.message.partition == 0:
            started.set()
            await release.wait()
            raise TimeoutError("upstream down")
        return "applied by B"

    a, b = direct_processor(app, env, token="tok-a"), direct_processor(app, env, token="tok-b")
    topic, ns = env["topic"], f"{env['group']}.handle"
    ta = asyncio.create_task(a.process([record(topic, 0, {"id": "k"})]))
    await asyncio.wait_for(started.wait(), 10)
    tb = asyncio.create_task(b.process([record(topic, 0, {"id": "k"}, partition=1)]))

    async def b_blocked() -> bool:
        n = await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND application_name = $1 AND query LIKE '%INSERT INTO dedup.inbox%'",
            env["app_name"],
        )
        return bool(n)

    await eventually(b_blocked, timeout_s=10, every_s=0.02)  # B waits on A's claim
    release.set()
    ra, rb = await asyncio.wait_for(asyncio.gather(ta, tb), 30)
    assert [h.outcome for h in ra.handled] == [FAILED]
    assert [h.outcome for h in rb.handled] == [APPLIED]
    assert calls == [0, 1]
    rec = (await inbox(pg, ns))["k"]
    assert (rec["status"], rec["result"], rec["partition"]) == ("done", "applied by B", 1)
