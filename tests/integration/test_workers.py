"""Real worker processes in one consumer group: scaling, crashes, a zombie, a drain.

Every test runs ``tests/apps/counting.py`` in separate processes over a six-partition topic
(harness: ``tests/integration/fleet.py``). One key in three is sent a second time, later, on
another partition, so copies are handled by different workers; the keys sent once show any
lost message. The app's effects table has no unique constraint: a message applied twice
would show up as two rows. Every test ends with each key applied exactly once and every
partition's stored position at its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

from tests.apps.counting import EFFECTS_DDL
from tests.conftest import create_topics
from tests.integration.fleet import (
    PARTITIONS,
    Feed,
    Fleet,
    Group,
    eventually,
    feeding,
    gt,
    proc_state,
    true,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(170)]


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def env(settings, unique, tmp_path) -> dict[str, str]:
    return {
        **os.environ,
        "COUNTING_TOPIC": f"workers-{unique}",
        "COUNTING_GROUP": f"gw-{unique}",
        "COUNTING_RUN": unique,
        "COUNTING_HOLD_DIR": str(tmp_path),
        "COUNTING_WORK_MS": "2",
        "CONSUMER_SESSION_TIMEOUT_MS": "6000",
        "CONSUMER_HEARTBEAT_INTERVAL_MS": "500",
        "CONSUMER_LEASE_MS": "2000",
        "CONSUMER_BATCH_MAX_RECORDS": "50",
        "CONSUMER_FETCH_TIMEOUT_MS": "100",
        "CONSUMER_STATUS_INTERVAL_S": "1",
        "CONSUMER_SHUTDOWN_GRACE_S": "30",
        "CONSUMER_RESTART_BACKOFF_S": "0.2",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
async def fleet(tmp_path, env):
    f = Fleet(tmp_path, env)
    try:
        yield f
    finally:
        f.cleanup()
        f.dump()


@pytest.fixture
async def group(settings, env, pg):
    await create_topics(settings, [env["COUNTING_TOPIC"]], PARTITIONS)
    await pg.execute(EFFECTS_DDL)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    g = Group(pg, admin, env)
    # The watcher needs its own connection: the test's queries share ``pg``.
    watch_conn = await asyncpg.connect(settings.postgres_dsn)
    watcher_group = Group(watch_conn, admin, env)
    watcher = asyncio.create_task(watcher_group.watch_offsets())
    g.regressions = watcher_group.regressions
    try:
        yield g
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await watch_conn.close()
        await admin.close()


# ---------------------------------------------------------------- tests


async def test_scale_out_and_in_while_batches_are_in_flight(fleet, group, producer):
    """Three workers, a fourth joins mid-stream, one leaves: each key applied once."""
    feed = Feed(producer, group.topic, {})
    for i in range(3):
        fleet.worker(f"w{i}", i, "--log-json")
    async with feeding(feed, minimum=1500):
        await eventually(lambda: gt(group.applied_keys(), 300), "300 keys applied by three")
        fourth = fleet.worker("w3", 3, "--log-json")
        await eventually(lambda: gt(group.applied_by(fourth.pid), 0), "the fourth applies")
        await fleet.terminate("w1")
        await group.more_applied(300)
    await group.wait_consumed(feed)
    await group.assert_exactly_once(feed)
    await fleet.terminate("w0", "w2", "w3")
    # --log-json: every line of every worker is JSON; the status lines carry the counters.
    for name in ("w0", "w1", "w2", "w3"):
        lines = [json.loads(line) for line in fleet.log(name).splitlines()]
        statuses = [rec["status"] for rec in lines if "status" in rec]
        assert statuses, f"{name} logged no status line"
        assert {"partitions", "msgs_per_s", "applied", "duplicates", "lag"} <= statuses[-1].keys()


async def test_worker_sigkilled_mid_batch_is_restarted(fleet, group, producer):
    """SIGKILL in the middle of a batch (effect written, not committed); the supervisor restarts."""
    trap = 400
    feed = Feed(producer, group.topic, {trap: {"hold_s": 30}})
    fleet.supervisor("sup", 3)
    held = fleet.dir / f"held-k{trap}"
    async with feeding(feed, minimum=1500):
        await eventually(lambda: true(held.exists() and held.read_text() != ""), "trap reached")
        victim = int(held.read_text())
        assert victim in fleet.children("sup")
        os.kill(victim, signal.SIGKILL)
        await eventually(
            lambda: true(
                "killed by SIGKILL" in fleet.log("sup") and len(fleet.children("sup")) == 3
            ),
            "the supervisor restarts the killed worker",
        )
        assert victim not in fleet.children("sup")
    await group.wait_consumed(feed)
    await group.assert_exactly_once(feed)
    await fleet.terminate("sup")
    assert f"(pid {victim}) killed by SIGKILL" in fleet.log("sup")
    assert "stopped: every worker drained" in fleet.log("sup")


async def test_zombie_past_lease_and_session_timeout(fleet, group, producer):
    """A worker frozen (SIGSTOP) mid-batch past its lease and session timeout, then resumed.

    It froze holding a fetched batch and its leases, just before that batch's transaction;
    the group gives its partitions to others, who process the same records. Resumed, the
    zombie commits its stale batch late: that must neither apply anything twice nor move a
    stored position back (sampled throughout by the ``group`` fixture).
    """
    trap = 300
    feed = Feed(producer, group.topic, {trap: {"freeze": True}})
    for i in range(3):
        fleet.worker(f"w{i}", i)
    frozen = fleet.dir / f"frozen-k{trap}"
    async with feeding(feed, minimum=1800):
        await eventually(lambda: true(frozen.exists() and frozen.read_text() != ""), "trap")
        zombie = int(frozen.read_text())
        await eventually(lambda: true(proc_state(zombie) == "T"), "the zombie is stopped")
        stopped_at = await group.pg.fetchval("SELECT now()")
        # The trap's partition was the zombie's when it froze (right after that batch).
        trap_part = await group.pg.fetchval(
            "SELECT part FROM test_worker_effects WHERE run = $1 AND k = $2 AND pid = $3",
            group.run,
            f"k{trap}",
            zombie,
        )
        assert trap_part is not None

        async def evicted() -> bool:
            state, members = await group.members()
            return state == "Stable" and len(members) == 2

        await eventually(evicted, "the group drops the frozen worker")
        token_prefix = f"{zombie}-".encode()

        async def leases_expired() -> bool:
            r = aioredis.from_url(os.environ["CONSUMER_REDIS_URL"])
            try:
                async for k in r.scan_iter(match=f"lease:{{{group.namespace}}}:*", count=1000):
                    if (await r.get(k) or b"").startswith(token_prefix):
                        return False
                return True
            finally:
                await r.aclose()

        await eventually(leases_expired, "the zombie's leases expire")

        async def taken_over() -> bool:
            n = await group.pg.fetchval(
                "SELECT count(*) FROM test_worker_effects WHERE run = $1 AND pid <> $2 "
                "AND part = $3 AND at > $4",
                group.run,
                zombie,
                trap_part,
                stopped_at,
            )
            return bool(n)

        await eventually(taken_over, "another worker takes over the zombie's partition")
        os.kill(zombie, signal.SIGCONT)
        await group.more_applied(200)
    await group.wait_consumed(feed)
    await group.assert_exactly_once(feed)
    await fleet.terminate("w0", "w1", "w2")


async def test_sigterm_drains_without_loss_or_duplicate(fleet, group, producer):
    """SIGTERM mid-stream: batches finish, leases are released, the group is left; then resume."""
    feed = Feed(producer, group.topic, {})
    fleet.supervisor("sup", 3)
    async with feeding(feed, minimum=1200):
        await eventually(lambda: gt(group.applied_keys(), 400), "400 keys applied")
        await fleet.terminate("sup")
        # Left the group (no waiting for the session timeout) and released every lease.
        state, members = await group.members()
        assert (state, members) == ("Empty", [])
        r = aioredis.from_url(os.environ["CONSUMER_REDIS_URL"])
        try:
            leases = [k async for k in r.scan_iter(match=f"lease:{{{group.namespace}}}:*")]
        finally:
            await r.aclose()
        assert leases == []
        # What was committed is consistent: one effect per done record, none twice.
        effects, keys = await group.pg.fetchrow(
            "SELECT count(*), count(DISTINCT k) FROM test_worker_effects WHERE run = $1", group.run
        )
        assert effects == keys
        assert keys == await group.pg.fetchval(
            "SELECT count(*) FROM dedup.inbox WHERE namespace = $1", group.namespace
        )
        fleet.supervisor("sup2", 2)
    await group.wait_consumed(feed)
    await group.assert_exactly_once(feed)
    await fleet.terminate("sup2")


async def test_workers_of_a_killed_supervisor_drain_by_themselves(fleet, group, producer):
    """A supervisor SIGKILLed cannot forward anything: its workers notice and drain alone."""
    feed = Feed(producer, group.topic, {})
    sup = fleet.supervisor("sup", 2)
    async with feeding(feed, minimum=600):
        await eventually(lambda: gt(group.applied_keys(), 100), "100 keys applied")
        workers = fleet.children("sup")
        assert len(workers) == 2
        sup.kill()
        await eventually(
            lambda: true(all(proc_state(pid) in ("Z", "gone") for pid in workers)),
            "the orphaned workers exit",
        )
        state, members = await group.members()
        assert (state, members) == ("Empty", [])  # they left the group on the way out
        fleet.supervisor("sup2", 2)
    await group.wait_consumed(feed)
    await group.assert_exactly_once(feed)
    await fleet.terminate("sup2")
    log = fleet.log("sup")  # the workers' lines go to their supervisor's output
    assert log.count("stopping (supervisor gone)") == len(workers)


async def test_static_membership_restart_keeps_the_slot(fleet, group, producer, env):
    """With static membership each slot has a stable instance id and returns to the group."""
    fleet.env = {**env, "CONSUMER_STATIC_MEMBERSHIP": "true"}
    feed = Feed(producer, group.topic, {})
    fleet.worker("s0", 0)
    fleet.worker("s1", 1)
    prefixes = [f"{group.group}-{os.uname().nodename}-{i}-" for i in range(2)]

    async def both_slots() -> bool:
        state, members = await group.members()
        return state == "Stable" and sorted(m[: len(prefixes[0])] for m in members) == prefixes

    async with feeding(feed, minimum=600):
        await eventually(both_slots, "members named by host and slot")
        await fleet.terminate("s1")
        # A static member does not leave on shutdown: its slot is kept for it.
        assert len((await group.members())[1]) == 2
        fleet.worker("s1b", 1)
        await group.more_applied(100)
        await eventually(both_slots, "the restarted slot rejoins under its instance id")
    await group.wait_consumed(feed)
    await group.assert_exactly_once(feed)
    await fleet.terminate("s0", "s1b")
