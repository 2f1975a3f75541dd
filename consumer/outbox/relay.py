"""The outbox relay: publishes committed outbox rows to Kafka, at least once, in order per key.

Woken by LISTEN/NOTIFY, with a polling fallback. Each tick: one transaction takes a few shards
(advisory locks), reads their oldest unpublished rows in id order, publishes them with an
idempotent producer (acks=all), and marks them published only after every ack. A crash
between ack and mark republishes the same rows with the same ``idempotency-key`` headers,
which a downstream consumer built with this framework applies once.

Also runs retention: published rows and expired inbox records are deleted in small batches.
It never reads or writes anything but ``dedup.outbox`` and expired ``dedup.inbox`` rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from typing import Any

from aiokafka import AIOKafkaProducer

from consumer import faults
from consumer.constants import NOTIFY_CHANNEL, OUTBOX_SHARDS
from consumer.db.pool import create_pool
from consumer.dedup import inbox
from consumer.outbox import store
from consumer.settings import Settings

log = logging.getLogger("consumer.relay")
_LOCK_BASE = 0x6F7574  # "out"


class Relay:
    """One relay. Several may run at once (in each worker, or as their own processes)."""

    def __init__(self, settings: Settings, pool: Any = None, shards_per_tick: int = 16) -> None:
        self.settings = settings
        self.pool = pool
        self._own_pool = pool is None
        self.shards_per_tick = shards_per_tick
        self.wake = asyncio.Event()
        self.published = 0
        self.errors = 0
        self.backlog = 0
        self.oldest_age_s = 0.0
        self._last_cleanup = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        if self.pool is None:
            self.pool = await create_pool(s.postgres_dsn, max_size=3)
        producer = AIOKafkaProducer(
            bootstrap_servers=s.kafka_bootstrap,
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
        )
        listener = None
        started = False
        try:
            while not stop.is_set():
                try:
                    if not started:
                        await producer.start()
                        started = True
                    if listener is None:
                        listener = await self._listen()
                    moved = await self.tick(producer)
                    await self._housekeeping()
                    if moved:
                        continue
                    await self._sleep(stop, s.relay_poll_ms / 1000)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.errors += 1
                    log.warning("relay: %s: %s; retrying", type(exc).__name__, exc)
                    if listener is not None:
                        with contextlib.suppress(Exception):
                            await listener.close()
                        listener = None
                    await self._sleep(stop, min(0.2 * 2 ** min(self.errors, 5), 5.0))
        finally:
            if listener is not None:
                with contextlib.suppress(Exception):
                    await listener.close()
            if started:
                with contextlib.suppress(Exception):
                    await producer.stop()
            if self._own_pool:
                await self.pool.close()

    async def _listen(self) -> Any:
        import asyncpg

        conn = await asyncpg.connect(self.settings.postgres_dsn)
        await conn.add_listener(NOTIFY_CHANNEL, lambda *_: self.wake.set())
        return conn

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        waiters = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stop.wait())]
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        self.wake.clear()

    async def tick(self, producer: AIOKafkaProducer) -> int:
        """Publish one round of rows; returns how many were published."""
        start = random.randrange(OUTBOX_SHARDS)
        async with self.pool.acquire() as conn, conn.transaction():
            text, args = store.claim_shards(_LOCK_BASE, start, self.shards_per_tick)
            shards = [r[0] for r in await conn.fetch(text, *args)]
            if not shards:
                return 0
            text, args = store.pending(shards, self.settings.relay_batch)
            rows = await conn.fetch(text, *args)
            if not rows:
                return 0
            futures = []
            for row in rows:
                headers = [(k, v.encode()) for k, v in _headers(row["headers"])]
                futures.append(
                    await producer.send(
                        row["topic"],
                        value=bytes(row["value"]),
                        key=bytes(row["key"]) if row["key"] is not None else None,
                        headers=headers,
                    )
                )
            await asyncio.gather(*futures)
            await faults.point("relay_after_ack")
            text, args = store.mark_published([r["id"] for r in rows])
            await conn.execute(text, *args)
        self.published += len(rows)
        return len(rows)

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_cleanup < self.settings.cleanup_interval_s:
            return
        self._last_cleanup = now
        s = self.settings
        async with self.pool.acquire() as conn:
            text, args = store.backlog()
            row = await conn.fetchrow(text, *args)
            self.backlog, self.oldest_age_s = int(row[0]), float(row[1])
            for query in (
                store.purge_published(s.outbox_retention_s, s.cleanup_batch),
                inbox.expire(s.dedup_window_s, s.cleanup_batch),
            ):
                # Each batch is its own short transaction.
                for _ in range(100):
                    status = await conn.execute(query[0], *query[1])
                    if int(status.split()[-1]) < s.cleanup_batch:
                        break


def _headers(raw: Any) -> list[tuple[str, str]]:
    items = json.loads(raw) if isinstance(raw, str) else raw
    return [(str(k), str(v)) for k, v in items]
