"""The relay must keep publishing whatever happens to its housekeeping.

``Relay.run`` calls ``housekeeping()`` (backlog figures, retention) before each tick. A
retention pass that fails every time (here ``now() - make_interval(secs => window)`` out of
PostgreSQL's timestamp range, for a window meant as "never expire") must not keep the tick from
running. And a worker stopping its relay must not wait on a producer whose broker never acks.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from pydantic import BaseModel

from consumer import App, Context, Settings
from consumer.outbox.relay import Relay
from consumer.runtime.worker import Worker
from tests.conftest import app_settings, eventually, read_topic
from tests.integration.test_relay import (  # noqa: F401  (fixtures)
    db,
    insert,
    pending,
    pool,
    relaying,
    row,
)

pytestmark = pytest.mark.integration


async def test_a_failing_retention_pass_does_not_stop_publishing(
    db: Settings,  # noqa: F811
    pool: Any,  # noqa: F811
    topics: Any,
) -> None:
    topic = await topics("r3ret", partitions=1)
    s = app_settings(db, dedup_window_s=10**12)  # accepted by Settings (ge=60, no maximum)
    await insert(pool, [row(topic, "k", {"n": 1}, "r3-1")])
    relay = Relay(s)

    async def tried() -> bool:
        return relay.errors >= 3 or await pending(pool) == 0

    async with relaying(relay):
        await eventually(tried, timeout_s=30)
    print("relay.last_error:", relay.last_error)
    assert await pending(pool) == 0, f"row never published; relay error: {relay.last_error}"
    assert len(await read_topic(s, topic, expect=1)) == 1


class _Any(BaseModel):
    n: int = 0


class _Unacked:
    """Stands in for AIOKafkaProducer while the broker accepts connections but never acks.

    That is what aiokafka does then with ``enable_idempotence=True``: a batch is retried, never
    expired, so its future stays pending and ``stop()`` (which flushes) does not return.
    """

    class _Cluster:
        def partitions_for_topic(self, topic: str) -> set[int]:
            return {0}

    class _Client:
        def __init__(self) -> None:
            self.cluster = _Unacked._Cluster()

    def __init__(self) -> None:
        self.client = self._Client()
        self.sent = 0

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    async def send(self, topic: str, **_: Any) -> asyncio.Future[Any]:
        self.sent += 1
        return asyncio.get_running_loop().create_future()

    async def stop(self) -> None:
        await asyncio.Event().wait()


async def test_a_worker_stops_its_relay_within_the_short_wait_it_promises(
    db: Settings,  # noqa: F811
    pool: Any,  # noqa: F811
    topics: Any,
    unique: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker.run waits ``wait_for(relay_task, 2)`` ("Short"), but cancelling the relay runs its
    ``finally``, which waits up to ``relay_publish_timeout_ms`` (30 s by default) more for
    ``producer.stop()``: past the supervisor's 25 s grace, so the worker is SIGKILLed."""
    topic = await topics("r3stop", partitions=1)
    fake = _Unacked()

    async def start_producer(self: Relay) -> Any:
        return fake

    monkeypatch.setattr(Relay, "start_producer", start_producer)
    # A publish timeout long enough to show the wait, short enough for a test.
    s = app_settings(db, relay_publish_timeout_ms=15_000, shutdown_grace_s=25.0)
    app = App(f"g-{unique}", settings=s)

    @app.handler(topic, schema=_Any, key="record")
    async def noop(p: _Any, ctx: Context) -> None:
        return None

    worker = Worker(app, s)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started.wait(), 30)
        await insert(pool, [row(topic, "k", {"n": 1}, "r3-stop-1")])

        async def in_flight() -> bool:
            return fake.sent >= 1

        await eventually(in_flight, timeout_s=20)
        worker.stop.set()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), 60)
        took = loop.time() - t0
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    # Generous against the 2 s the code intends, far below the 15 s it actually waits.
    assert took < 8.0, f"worker took {took:.1f}s to stop (relay wait meant to be 2 s)"


class _SlowAck(_Unacked):
    """A broker that acks every send after ``delay_s``."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def send(self, topic: str, **_: Any) -> asyncio.Future[Any]:
        self.sent += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(self.delay_s, fut.set_result, None)
        return fut

    async def stop(self) -> None:
        return None


async def test_slow_acks_on_a_worker_pool_do_not_kill_the_relay_transaction(
    db: Settings,  # noqa: F811
    topics: Any,
) -> None:
    """On a worker's pool the sessions end after idling in a transaction for the handler
    timeout plus the lease (1 s here); a relay waiting longer for the broker's ack must still
    mark its rows, or it would send them again on every tick while the broker is slow."""
    from consumer.db.pool import create_pool

    topic = await topics("r3slow", partitions=1)
    worker_pool = await create_pool(db.postgres_dsn, max_size=2, idle_in_tx_ms=1_000)
    try:
        await insert(worker_pool, [row(topic, "k", {"n": 1}, "r3-slow-1")])
        relay = Relay(app_settings(db, relay_publish_timeout_ms=5_000), pool=worker_pool)
        fake = _SlowAck(delay_s=2.0)
        assert await relay.tick(fake) == 1  # acked after 2 s, marked in the same session
        assert await pending(worker_pool) == 0
        assert fake.sent == 1
    finally:
        await worker_pool.close()
