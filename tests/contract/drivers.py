"""One interface over three backends, so the contract scenarios are written once.

* ``HarnessDriver``: :class:`consumer.testing.TestApp`, in memory or on real PostgreSQL;
* ``RuntimeDriver``: a real :class:`~consumer.runtime.worker.Worker` consuming real Kafka, with
  real Redis and PostgreSQL. A crash is a BaseException raised at the fault point, which ends
  the worker's task with no cleanup of leases or done markers (its ``finally`` still closes
  its clients); a new Worker then takes over, as the supervisor would start one.

Observations are the same on every backend: the outcome the runtime recorded for the sent
record, committed outgoing messages (outbox rows: what the relay publishes), inbox records,
and how often the handler ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
import msgpack
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from consumer import App, Outcome, Settings
from consumer.db.pool import _init as init_connection
from consumer.dedup import inbox
from consumer.dedup.inbox import InboxRecord
from consumer.runtime.outcomes import BatchResult, Handled
from consumer.runtime.stats import Stats
from consumer.runtime.worker import Worker
from consumer.testing import TestApp, faults
from tests.conftest import eventually


@dataclass(frozen=True)
class Seen:
    outcome: Outcome | None  # None: the worker died before it could report (crash after commit)
    reason: str = ""
    result: Any = None
    crashed: str | None = None


@dataclass(frozen=True)
class Out:
    """One committed outgoing message."""

    key: bytes | None
    value: Any  # decoded
    headers: dict[str, str]


class Driver(Protocol):
    topic: str
    out: str
    calls: Counter[str]

    async def send(self, value: Mapping[str, Any] | bytes, *, partition: int = 0) -> Seen: ...
    async def send_batch(self, values: list[Mapping[str, Any]]) -> list[Seen]: ...
    def crash_next(self, point: str) -> None: ...
    async def flush_redis(self) -> None: ...
    async def messages(self, topic: str) -> list[Out]: ...
    async def inbox(self, key: str) -> InboxRecord | None: ...


class HarnessDriver:
    def __init__(self, t: TestApp, topic: str, out: str, calls: Counter[str]) -> None:
        self.t, self.topic, self.out, self.calls = t, topic, out, calls

    async def send(self, value: Mapping[str, Any] | bytes, *, partition: int = 0) -> Seen:
        r = await self.t.send(self.topic, value, partition=partition)
        return Seen(r.outcome, r.reason, r.result, r.crashed)

    async def send_batch(self, values: list[Mapping[str, Any]]) -> list[Seen]:
        rs = await self.t.send_batch(self.topic, values)
        return [Seen(r.outcome, r.reason, r.result, r.crashed) for r in rs]

    def crash_next(self, point: str) -> None:
        {"after_commit": self.t.crash_after_commit, "before_commit": self.t.crash_before_commit}[
            point
        ]()

    async def flush_redis(self) -> None:
        self.t.flush_redis()

    async def messages(self, topic: str) -> list[Out]:
        out = []
        for m in self.t.published(topic):
            hdrs = {k: v.decode() for k, v in m.headers}
            out.append(Out(m.key, _decode(m.value or b"", hdrs), hdrs))
        return out

    async def inbox(self, key: str) -> InboxRecord | None:
        return await self.t.inbox(self.topic, key)


class _Crash(BaseException):
    """The worker process dies at a fault point."""


class _Recording(Stats):
    """Worker stats that also keep each record's outcome, by (topic, partition, offset)."""

    def __init__(self, seen: dict[tuple[str, int, int], Handled]) -> None:
        super().__init__()
        self.seen = seen

    def add(self, result: BatchResult) -> None:
        super().add(result)
        for h in result.handled:
            pos = (h.message.topic, h.message.partition, h.message.offset)
            # A record read again after a takeover is SKIPPED (the stored position is past
            # it): that is a re-read, not what became of the record.
            if h.outcome is not Outcome.SKIPPED or pos not in self.seen:
                self.seen[pos] = h


class RuntimeDriver:
    def __init__(
        self,
        app: App,
        settings: Settings,
        producer: AIOKafkaProducer,
        topic: str,
        out: str,
        calls: Counter[str],
    ) -> None:
        self.app, self.settings, self.producer = app, settings, producer
        self.topic, self.out, self.calls = topic, out, calls
        self.seen: dict[tuple[str, int, int], Handled] = {}
        self.worker: Worker | None = None
        self.task: asyncio.Task[None] | None = None
        self.pg: asyncpg.Connection | None = None
        self._crash: str | None = None

    async def start(self) -> None:
        # The worker keeps the process-wide probe it was built with: make it the fault-point
        # one now, so that hooks installed later (crash_next, send_batch) reach this worker.
        faults.install("before_fetch", None)
        self.pg = await asyncpg.connect(self.settings.postgres_dsn)
        await init_connection(self.pg)
        await self._start_worker()

    async def _start_worker(self) -> None:
        worker = Worker(self.app, self.settings)
        worker.stats = _Recording(self.seen)
        self.worker = worker
        self.task = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.started.wait(), 30)

    async def close(self) -> None:
        for point in ("after_commit", "before_commit"):
            faults.install(point, None)
        if self.worker is not None and self.task is not None:
            self.worker.stop.set()
            with contextlib.suppress(_Crash):
                await asyncio.wait_for(self.task, 60)
        if self.pg is not None:
            # This test's rows, on topics no one else uses: observed already, and without a
            # relay here they would sit in the shared outbox as a backlog.
            await self.pg.execute(
                "DELETE FROM dedup.outbox WHERE topic = ANY($1::text[])",
                [self.out, self.topic + ".dlq", self.topic + ".conflicts"],
            )
            await self.pg.close()

    def crash_next(self, point: str) -> None:
        self._crash = point

        async def die(name: str) -> None:
            faults.install(name, None)  # one crash, then the point is inert again
            assert self.worker is not None
            self.worker.stop.set()  # lets its relay task end with it instead of timing out
            raise _Crash(name)

        faults.install(point, die)

    async def send(self, value: Mapping[str, Any] | bytes, *, partition: int = 0) -> Seen:
        raw = value if isinstance(value, bytes) else msgpack.packb(dict(value))
        md = await self.producer.send_and_wait(self.topic, raw, partition=partition)
        [seen] = await self._outcomes([(self.topic, md.partition, md.offset)])
        return seen

    async def send_batch(self, values: list[Mapping[str, Any]]) -> list[Seen]:
        """The records reach the worker in one fetch, hence one batch: it is held at its
        next fetch while they are produced (in one produce request), then let go."""
        parked, go = asyncio.Event(), asyncio.Event()

        async def hold(name: str) -> None:
            faults.install(name, None)
            parked.set()
            await go.wait()

        faults.install("before_fetch", hold)
        await asyncio.wait_for(parked.wait(), 30)
        try:
            sent = [
                await self.producer.send(self.topic, msgpack.packb(dict(v)), partition=0)
                for v in values
            ]
            mds = [await f for f in sent]
        finally:
            go.set()
        return await self._outcomes([(self.topic, md.partition, md.offset) for md in mds])

    async def _outcomes(self, positions: list[tuple[str, int, int]]) -> list[Seen]:
        crashed, self._crash = self._crash, None
        if crashed is not None:
            assert self.task is not None
            with contextlib.suppress(_Crash):
                await asyncio.wait_for(self.task, 30)
            assert isinstance(self.task.exception(), _Crash), "the armed crash did not fire"
            await self._start_worker()
            if crashed == "after_commit":
                # Committed, but the worker died before reporting; the new one seeks past it.
                return [Seen(None, crashed=crashed) for _ in positions]

        async def reported() -> bool:
            return all(
                pos in self.seen and self.seen[pos].outcome is not Outcome.SKIPPED
                for pos in positions
            )

        await eventually(reported, timeout_s=30)
        hs = [self.seen[pos] for pos in positions]
        return [Seen(h.outcome, h.reason, h.result, crashed) for h in hs]

    async def flush_redis(self) -> None:
        # Only this test's keys: the Redis is shared (never FLUSHALL it).
        namespace = f"{self.app.group}.handle"
        r = aioredis.Redis.from_url(self.settings.redis_url)
        try:
            keys = [k async for k in r.scan_iter(match=f"*{{{namespace}}}*", count=1000)]
            if keys:
                await r.delete(*keys)
        finally:
            await r.aclose()

    async def messages(self, topic: str) -> list[Out]:
        assert self.pg is not None
        rows = await self.pg.fetch(
            "SELECT key, value, headers FROM dedup.outbox WHERE topic = $1 ORDER BY id", topic
        )
        out = []
        for r in rows:
            headers = (
                r["headers"] if not isinstance(r["headers"], str) else json.loads(r["headers"])
            )
            hdrs = {k: v for k, v in headers}
            out.append(Out(r["key"], _decode(r["value"], hdrs), hdrs))
        return out

    async def inbox(self, key: str) -> InboxRecord | None:
        assert self.pg is not None
        text, args = inbox.records([(f"{self.app.group}.handle", key)])
        row = await self.pg.fetchrow(text, *args)
        return None if row is None else InboxRecord(*row)


def _decode(value: bytes, headers: dict[str, str]) -> Any:
    if headers.get("content-type") == "application/json":
        return json.loads(value)
    try:
        return msgpack.unpackb(value)
    except Exception:  # a dead letter keeps the original bytes, decodable or not
        return value
