"""The worker's rebalance listener and its event loop, with workers in this process.

Revocation waits for the batch in flight; assignment seeks to the stored positions (and
drops records fetched before the seek); a blocking sync handler runs in a thread and costs no
rebalance. The relay is off: the shared test database holds other tests' outbox rows.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from aiokafka import TopicPartition

from consumer import App, Context
from consumer.runtime.rebalance import RebalanceListener as _Listener
from tests.apps.counting import Count
from tests.conftest import app_settings, running
from tests.integration.fleet import eventually, headers_for, true

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def test_revocation_waits_for_the_batch_in_flight(
    settings, topics, producer, unique, monkeypatch
):
    """Partitions are given up only after the batch in flight has finished and committed."""
    topic = await topics("revoke", partitions=2)
    s = app_settings(
        settings, session_timeout_ms=6000, heartbeat_interval_ms=200, relay_enabled=False
    )
    app = App(f"gr-{unique}", settings=s)
    entered, release = asyncio.Event(), asyncio.Event()
    events: list[str] = []

    @app.handler(topic, schema=Count, key="header")
    async def held(p: Count, ctx: Context) -> int:
        if p.hold_s:
            entered.set()
            await release.wait()
            events.append("handler returned")
        return p.n

    revoked = _Listener.on_partitions_revoked

    async def traced(self: _Listener, tps: Any) -> None:
        events.append(f"revoke {self.worker.worker_id} begins")
        await revoked(self, tps)
        events.append(f"revoke {self.worker.worker_id} ends")

    monkeypatch.setattr(_Listener, "on_partitions_revoked", traced)
    body = json.dumps({"n": 1, "hold_s": 1}).encode()
    await producer.send_and_wait(topic, body, partition=0, headers=headers_for("h"))
    async with running(app, s, worker_id=0) as first:
        await asyncio.wait_for(entered.wait(), 30)
        events.clear()
        async with running(app, s, worker_id=1):
            await eventually(lambda: true("revoke 0 begins" in events), "a rebalance begins")
            assert "revoke 0 ends" not in events  # the batch still holds its partition
            release.set()
            await eventually(lambda: true("revoke 0 ends" in events), "the revocation ends")
    assert events.index("handler returned") < events.index("revoke 0 ends")
    assert first.stats.by_outcome["applied"] == 1


async def test_assignment_seeks_to_the_stored_position(settings, topics, producer, pg, unique):
    """The database's position wins over Kafka's: records below it are never even fetched."""
    topic = await topics("seek", partitions=1)
    app = App(f"gs-{unique}", settings=app_settings(settings, relay_enabled=False))
    seen: list[int] = []

    @app.handler(topic, schema=Count, key="header")
    async def record(p: Count, ctx: Context) -> int:
        seen.append(p.n)
        return p.n

    for n in range(10):
        await producer.send_and_wait(
            topic, json.dumps({"n": n}).encode(), headers=headers_for(f"s{n}")
        )
    await pg.execute(
        "INSERT INTO dedup.offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, 0, 6)",
        app.group,
        topic,
    )
    async with running(app) as worker:

        async def at_end() -> bool:
            return worker.stats.consumed >= 4

        await eventually(at_end, "four records handled")
    assert seen == [6, 7, 8, 9]
    assert worker.stats.by_outcome["skipped"] == 0  # not fetched at all, rather than skipped
    stored = await pg.fetchval(
        "SELECT next_offset FROM dedup.offsets WHERE group_id = $1 AND topic = $2",
        app.group,
        topic,
    )
    assert stored == 10


async def test_a_blocking_sync_handler_does_not_starve_the_heartbeat(
    settings, topics, producer, unique
):
    """A sync handler runs in a thread: blocking past the session timeout costs no rebalance."""
    topic = await topics("sync", partitions=1)
    s = app_settings(
        settings, session_timeout_ms=6000, heartbeat_interval_ms=500, relay_enabled=False
    )
    app = App(f"gy-{unique}", settings=s)

    @app.handler(topic, schema=Count, key="header")
    def blocking(p: Count, ctx: Context) -> int:
        time.sleep(p.hold_s)  # a sync client library, say
        return p.n

    async with running(app, s) as worker:
        await eventually(lambda: true(bool(worker.stats.partitions)), "partition assigned")
        rebalances = worker.stats.rebalances
        body = json.dumps({"n": 1, "hold_s": 8}).encode()
        await producer.send_and_wait(topic, body, headers=headers_for("slow"))
        await eventually(lambda: true(worker.stats.consumed == 1), "handled")
        assert worker.stats.by_outcome["applied"] == 1
        # Still a member all along: the Kafka commit after the batch was accepted (an evicted
        # member's is refused, and nothing would commit again), and no rebalance happened.
        tp = TopicPartition(topic, 0)
        assert worker.consumer is not None
        assert await worker.consumer.committed(tp) == 1
        assert worker.stats.rebalances == rebalances
