"""Stored positions the broker does not have are never skipped (issue 13, finding 3).

A topic deleted and re-created keeps its group's stored positions in PostgreSQL; retention can
delete records the group never read. Either way the partition halts (paused, an error line,
``consumer_partition_halted``) and the others go on, until ``consumer reset-positions``
moves it; the running worker then resumes it. And a partition the database has no position
for starts at its log start, whatever offset Kafka has committed for the group.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import REGISTRY

from consumer import App, Context
from consumer.exitcodes import RET_OK, RET_UNCONFIRMED
from consumer.runtime.outcomes import Outcome
from tests.conftest import ROOT, app_settings, create_topics, eventually, running
from tests.integration.dedup_support import (
    Pay,
    Spy,
    cleanup,
    send,
    stored_offset,
    wait_offset,
)

pytestmark = pytest.mark.integration

EFFECTS = "CREATE TABLE IF NOT EXISTS test_position_effects (k text NOT NULL)"


def _app(settings: Any, group: str, topic: str) -> App:
    app = App(group, settings=app_settings(settings, relay_enabled=False))

    @app.handler(topic, schema=Pay, key=lambda p: p.id)
    async def apply(p: Pay, ctx: Context) -> None:
        await ctx.db.execute("INSERT INTO test_position_effects VALUES ($1)", p.id)

    return app


async def _applied(pg: Any, unique: str) -> list[str]:
    rows = await pg.fetch("SELECT k FROM test_position_effects WHERE k LIKE $1", f"%{unique}")
    return sorted(r[0].removesuffix(f"-{unique}") for r in rows)


def _halted(topic: str, partition: int, reason: str) -> float | None:
    return REGISTRY.get_sample_value(
        "consumer_partition_halted",
        {"topic": topic, "partition": str(partition), "reason": reason},
    )


def _reset_cli(group: str, topic: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COUNTING_TOPIC": topic, "COUNTING_GROUP": group}
    command = ["reset-positions", "tests.apps.counting:app", "--topic", topic, *argv]
    return subprocess.run(
        [sys.executable, "-m", "consumer", *command],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
async def admin(settings):
    client = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def effects(pg, unique):
    await pg.execute(EFFECTS)
    yield
    await pg.execute("DELETE FROM test_position_effects WHERE k LIKE $1", f"%{unique}")
    await cleanup(pg, unique)


async def test_recreated_topic_halts_the_partition_until_positions_are_reset(
    settings, topics, producer, pg, unique, admin, effects, caplog
):
    topic = await topics("recreate", partitions=2)
    group = f"g-{unique}"
    app = _app(settings, group, topic)
    for i in range(5):
        await send(producer, topic, {"id": f"old{i}-{unique}"}, partition=0)
    async with running(app):
        await wait_offset(pg, group, topic, 0, 5)

    await admin.delete_topics([topic])

    async def gone() -> bool:
        return topic not in await admin.list_topics()

    await eventually(gone)
    await create_topics(settings, [topic], 2)
    for i in range(3):
        await send(producer, topic, {"id": f"new{i}-{unique}"}, partition=0)
    for i in range(2):
        await send(producer, topic, {"id": f"p1n{i}-{unique}"}, partition=1)

    caplog.set_level(logging.ERROR, logger="consumer.worker")
    async with running(app) as worker:
        tp0 = TopicPartition(topic, 0)

        async def halted() -> bool:
            return tp0 in getattr(worker, "halted", {})  # (no attribute before the fix)

        await eventually(halted)
        await wait_offset(pg, group, topic, 1, 2)  # the other partition goes on
        assert worker.halted[tp0] == (5, "beyond_log_end")
        assert _halted(topic, 0, "beyond_log_end") == 1
        halts = [r for r in caplog.records if "HALTED" in r.getMessage()]
        assert len(halts) == 1 and f"{topic}/0" in halts[0].getMessage()
        # Nothing of the re-created partition was applied or skipped: position untouched.
        assert await stored_offset(pg, group, topic, 0) == 5
        assert [k for k in await _applied(pg, unique) if k.startswith("new")] == []

        refused = _reset_cli(group, topic, "--partition", "0", "--to-earliest")
        assert refused.returncode == RET_UNCONFIRMED, refused.stderr
        assert await stored_offset(pg, group, topic, 0) == 5

        done = _reset_cli(group, topic, "--partition", "0", "--to-earliest", "--yes")
        assert done.returncode == RET_OK, done.stderr
        assert "5" in done.stdout and "0" in done.stdout

        await wait_offset(pg, group, topic, 0, 3)  # the worker noticed the reset
        assert tp0 not in worker.halted
        assert _halted(topic, 0, "beyond_log_end") == 0
    assert await _applied(pg, unique) == sorted(
        [f"old{i}" for i in range(5)] + [f"new{i}" for i in range(3)] + ["p1n0", "p1n1"]
    )


async def test_records_deleted_before_they_were_consumed_halt_the_partition(
    settings, topics, producer, pg, unique, admin, effects
):
    topic = await topics("retention", partitions=1)
    group = f"g-{unique}"
    app = _app(settings, group, topic)
    for i in range(2):
        await send(producer, topic, {"id": f"a{i}-{unique}"})
    async with running(app):
        await wait_offset(pg, group, topic, 0, 2)
    for i in range(3):  # offsets 2, 3, 4: never consumed, then deleted up to 4
        await send(producer, topic, {"id": f"b{i}-{unique}"})
    tp = TopicPartition(topic, 0)
    await admin.delete_records({tp: RecordsToDelete(before_offset=4)}, timeout_ms=10_000)

    async with running(app) as worker:

        async def halted() -> bool:
            return tp in getattr(worker, "halted", {})

        await eventually(halted)
        assert worker.halted[tp] == (2, "before_log_start")
        assert _halted(topic, 0, "before_log_start") == 1
        assert await stored_offset(pg, group, topic, 0) == 2
        done = _reset_cli(group, topic, "--to-offset", "4", "--yes")
        assert done.returncode == RET_OK, done.stderr
        await wait_offset(pg, group, topic, 0, 5)
    assert await _applied(pg, unique) == ["a0", "a1", "b2"]


async def test_a_partition_without_stored_position_starts_at_the_log_start(
    settings, topics, producer, pg, unique, effects
):
    """PostgreSQL lost the group's positions (restored from a dump taken before its first
    commit); Kafka still has a committed offset for it. The database decides: from 0."""
    topic = await topics("nopos", partitions=1)
    group = f"g-{unique}"
    for i in range(4):
        await send(producer, topic, {"id": f"k{i}-{unique}"})
    committer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    await committer.start()
    try:
        tp = TopicPartition(topic, 0)
        committer.assign([tp])
        await committer.commit({tp: OffsetAndMetadata(3, "")})
    finally:
        await committer.stop()
    async with running(_app(settings, group, topic)):
        await wait_offset(pg, group, topic, 0, 4)
    assert await _applied(pg, unique) == ["k0", "k1", "k2", "k3"]


async def test_a_position_moved_back_under_a_running_worker_is_re_read(
    settings, topics, producer, pg, unique, effects
):
    """PostgreSQL lost its last transactions while the worker ran (a restore, a failover to
    a lagging asynchronous replica; the pool reconnects): the stored position went back from
    3 to 1 and the inbox lost k1 and k2 (Redis keeps their done markers). The worker's fetch
    position is still 3; its next batch finds the stored position behind what it committed,
    and re-reads from there, so k1 and k2 are applied again, once."""
    topic = await topics("movedback", partitions=1)
    group = f"g-{unique}"
    keys = [f"k{i}-{unique}" for i in range(4)]
    async with running(_app(settings, group, topic)) as worker:
        for k in keys[:3]:
            await send(producer, topic, {"id": k})
        await wait_offset(pg, group, topic, 0, 3)
        async with pg.transaction():  # the state a backup taken after k0 restores
            await pg.execute("DELETE FROM test_position_effects WHERE k = ANY($1)", keys[1:3])
            await pg.execute("DELETE FROM dedup.inbox WHERE key = ANY($1)", keys[1:3])
            await pg.execute(
                "UPDATE dedup.offsets SET next_offset = 1 "
                "WHERE group_id = $1 AND topic = $2 AND partition = 0",
                group,
                topic,
            )
        spy = Spy(worker)
        last = await send(producer, topic, {"id": keys[3]})
        await wait_offset(pg, group, topic, 0, last + 1)
    assert await _applied(pg, unique) == ["k0", "k1", "k2", "k3"]
    assert spy.at(0, 1) == [Outcome.APPLIED] and spy.at(0, 2) == [Outcome.APPLIED]


async def test_reset_positions_back_on_a_running_partition_takes_effect(
    settings, topics, producer, pg, unique, effects
):
    """`reset-positions --to-offset 1` on a partition a worker is consuming (not halted): the
    worker's next batch commits after the reset; it must not overwrite the reset with its own
    position (a lost reset): records from 1 are re-read (duplicates here), none skipped."""
    topic = await topics("resetlive", partitions=1)
    group = f"g-{unique}"
    async with running(_app(settings, group, topic)) as worker:
        for i in range(3):
            await send(producer, topic, {"id": f"k{i}-{unique}"})
        await wait_offset(pg, group, topic, 0, 3)
        done = _reset_cli(group, topic, "--partition", "0", "--to-offset", "1", "--yes")
        assert done.returncode == RET_OK, done.stderr
        assert await stored_offset(pg, group, topic, 0) == 1
        spy = Spy(worker)
        last = await send(producer, topic, {"id": f"k3-{unique}"})
        await wait_offset(pg, group, topic, 0, last + 1)
    assert spy.at(0, 1) == [Outcome.DUPLICATE] and spy.at(0, 2) == [Outcome.DUPLICATE]
    assert await _applied(pg, unique) == ["k0", "k1", "k2", "k3"]


async def test_reset_positions_says_how_many_records_it_skips(
    settings, topics, producer, pg, unique, effects
):
    """Moving a position forward past records skips them: the command says how many, per
    partition, before it asks (and with --yes)."""
    topic = await topics("resetskip", partitions=2)
    group = f"g-{unique}"
    for i in range(5):
        await send(producer, topic, {"id": f"k{i}-{unique}"}, partition=0)
    await send(producer, topic, {"id": f"p1-{unique}"}, partition=1)
    done = _reset_cli(group, topic, "--partition", "0", "--to-offset", "3", "--yes")
    assert done.returncode == RET_OK, done.stderr
    assert "partition 0: 3 record(s) skipped (offsets 0..2)" in done.stdout
    again = _reset_cli(group, topic, "--partition", "0", "--to-offset", "4", "--yes")
    assert "partition 0: 1 record(s) skipped (offsets 3..3)" in again.stdout  # from 3 now
    back = _reset_cli(group, topic, "--to-earliest", "--yes")
    assert back.returncode == RET_OK and "skipped (" not in back.stdout
    assert await stored_offset(pg, group, topic, 0) == 0


async def test_reset_positions_to_latest_lets_a_new_group_skip_the_history(
    settings, topics, producer, pg, unique, effects
):
    """A new group that must not process a topic's history: --to-latest stores each
    partition's log end, says what it skips, and the worker applies only what comes next."""
    topic = await topics("tolatest", partitions=2)
    group = f"g-{unique}"
    for i in range(3):
        await send(producer, topic, {"id": f"old{i}-{unique}"}, partition=0)
    await send(producer, topic, {"id": f"old3-{unique}"}, partition=1)
    done = _reset_cli(group, topic, "--to-latest", "--yes")
    assert done.returncode == RET_OK, done.stderr
    assert "partition 0: 3 record(s) skipped (offsets 0..2)" in done.stdout
    assert "partition 1: 1 record(s) skipped (offsets 0..0)" in done.stdout
    async with running(_app(settings, group, topic)):
        last = await send(producer, topic, {"id": f"new-{unique}"}, partition=0)
        await wait_offset(pg, group, topic, 0, last + 1)
    assert await _applied(pg, unique) == ["new"]
