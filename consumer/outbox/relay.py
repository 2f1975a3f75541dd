"""The outbox relay: publishes committed outbox rows to Kafka, at least once, in order per key.

Each tick is one PostgreSQL transaction: take a few shards (transaction-scoped advisory
locks), read their oldest unpublished rows in id order, publish them with an idempotent
producer (``acks=all``), wait for the broker's acks, and only then mark the acked rows
published and commit. A crash anywhere before that commit leaves the rows pending; the next
tick (this relay or another) publishes them again with the same ``idempotency-key`` headers,
and a downstream consumer built with this framework applies them once.

The parts, each in its own module: sending a tick's rows and collecting acks
(consumer/outbox/sending.py), destinations held back after a refusal (holds.py), missing
topics and the replies given up to them (topics.py), the producer (producer.py), the
LISTEN/NOTIFY wake-up with polling as the fallback (wakeup.py), the figures (figures.py).
Between ticks it refreshes the backlog figures and runs retention (retention.py).

It reads and writes ``dedup.outbox`` only (retention also expires ``dedup.inbox`` rows);
it never touches a handler's tables and never consumes from Kafka. It imports nothing of the
layers above it: metrics and logs observe it (``observers.relay_pass``), the publishing span
and the test hook are passed in (docs/design.md, "Layers").
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from aiokafka import AIOKafkaProducer

from consumer.constants import OUTBOX_SHARDS
from consumer.db.pool import create_pool
from consumer.observers import Observer, Observers
from consumer.outbox import producer as producers
from consumer.outbox import retention, store
from consumer.outbox.figures import Figures
from consumer.outbox.holds import Holds
from consumer.outbox.producer import BrokerUnavailable, Sender
from consumer.outbox.sending import Publisher, PublishSpan, no_span
from consumer.outbox.topics import (
    GIVE_UP_REPLY_TOPIC_MISSING,
    LOCK_BASE,
    MISSING_TOPIC_REPORT_S,
    ReplyGiveUp,
    report_missing,
)
from consumer.outbox.wakeup import Wakeup
from consumer.probe import Probe, installed
from consumer.settings import Settings

__all__ = ["GIVE_UP_REPLY_TOPIC_MISSING", "BrokerUnavailable", "Relay", "Sender"]

log = logging.getLogger(__name__)


class Relay(Figures):
    """One relay. Several may run at once (in each worker, or as their own processes).

    Its figures (consumer/outbox/figures.py) are attributes: ``backlog``, ``published``,
    ``failed`` ... and ``held`` (destinations currently held back). ``observers`` hear
    ``relay_pass`` after every pass; ``publish_span`` makes the span of each send
    (consumer/tracing.py ``publishing``); ``probe`` is the test hook (consumer/probe.py).
    """

    def __init__(
        self,
        settings: Settings,
        pool: Any = None,
        shards_per_tick: int = 16,
        backlog_interval_s: float = 5.0,
        *,
        observers: Observer | None = None,
        publish_span: PublishSpan | None = None,
        probe: Probe | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.pool = pool
        self._own_pool = pool is None
        self.shards_per_tick = shards_per_tick
        self.backlog_interval_s = backlog_interval_s
        # Without hooks: nobody observes, sends get no span, the process-wide probe.
        observers = observers or Observer()
        publish_span = publish_span or no_span
        # One that raises is logged and ignored, never allowed to stop the relay.
        self.observers = observers if isinstance(observers, Observers) else Observers([observers])
        self.probe = probe or installed()
        self._holds = Holds(self)
        timeout_s = settings.relay_publish_timeout_ms / 1000
        self._publisher = Publisher(self, self._holds, publish_span, timeout_s)
        self._give_up = ReplyGiveUp(settings, self)
        self._wakeup = Wakeup(settings.postgres_dsn)
        self.wake = self._wakeup.event
        self._next_backlog = 0.0
        self._next_cleanup = 0.0
        self._next_missing_report = 0.0

    # ---------------------------------------------------------------- the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set. Survives broker and database outages by retrying."""
        if self._own_pool:
            dsn = self.settings.require_connections().postgres_dsn
            self.pool = await create_pool(dsn, max_size=3)
        producer: AIOKafkaProducer | None = None
        failures = 0
        try:
            while not stop.is_set():
                self.observers.relay_pass(self)  # the figures of the previous pass
                # Cleared before the tick: a NOTIFY arriving during it wakes the next one.
                self.wake.clear()
                try:
                    await self._wakeup.listen()
                    await self.housekeeping()
                    if producer is None:
                        producer = await self.start_producer()
                    moved = await self.tick(producer)
                    failures = 0
                    self.loops += 1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failures += 1
                    await self._failed_pass(stop, exc, failures)
                    continue
                if moved:
                    await asyncio.sleep(0)
                    continue
                await self._wakeup.sleep(stop, self.settings.relay_poll_ms / 1000)
        finally:
            await self._close(producer, stopping=stop.is_set())

    async def _failed_pass(self, stop: asyncio.Event, exc: Exception, failures: int) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("relay: %s; retrying", self.last_error)
        # Not woken by NOTIFY: with the broker down, every commit elsewhere would otherwise
        # trigger another doomed attempt.
        await self._wakeup.sleep(stop, min(0.2 * 2 ** min(failures, 5), 5.0), wake=False)

    async def _close(self, producer: AIOKafkaProducer | None, *, stopping: bool) -> None:
        await self._wakeup.close()
        if producer is not None:
            await producers.stop(producer, self.settings, stopping=stopping)
        if self._own_pool and self.pool is not None:
            await self.pool.close()
        log.info(
            "relay stopped: published=%d failed=%d out_of_order=%d errors=%d",
            self.published,
            self.failed,
            self.out_of_order,
            self.errors,
        )

    async def start_producer(self) -> AIOKafkaProducer:
        """A started idempotent producer (``acks=all``) configured from the settings."""
        return await producers.start(self.settings)

    # ---------------------------------------------------------------- one tick

    async def tick(self, producer: Sender) -> int:
        """Publish one round of rows; returns how many were acked and marked published."""
        blocked = self._holds.blocked()
        start = random.randrange(OUTBOX_SHARDS)
        # READ COMMITTED is required, not just the default: the rows are read by a statement
        # that starts after the shard locks are held, so its snapshot includes the marks of
        # the relay that held them before. Under REPEATABLE READ the snapshot would date from
        # before the lock and could re-publish rows that relay had just marked.
        async with self.pool.acquire() as conn, conn.transaction(isolation="read_committed"):
            # The transaction stays idle while the broker acks (up to the publish timeout, and
            # 10 s more for a topic just created): on a worker's pool, whose idle timeout is
            # sized for handlers, the session would be killed first and every row re-sent.
            idle_ms = self.settings.relay_publish_timeout_ms + 20_000
            await conn.execute(f"SET LOCAL idle_in_transaction_session_timeout = {idle_ms}")
            text, args = store.claim_shards(LOCK_BASE, start, self.shards_per_tick, blocked)
            shards = [r[0] for r in await conn.fetch(text, *args)]
            if not shards:
                return 0
            text, args = store.pending(shards, self.settings.relay_batch, blocked)
            rows = await conn.fetch(text, *args)
            if not rows:
                return 0
            acked, absent = await self._publisher.publish(producer, rows)
            await self.probe.point("relay_after_ack")
            if acked:
                text, args = store.mark_published(acked)
                await conn.execute(text, *args)
            if absent:
                await self._give_up(conn, sorted(absent))
        self.published += len(acked)
        return len(acked)

    @property
    def held(self) -> int:
        """Destinations held back now (a key after a refused row, a missing topic)."""
        return self._holds.count()

    # ---------------------------------------------------------------- backlog and retention

    async def refresh_backlog(self) -> None:
        """Read the backlog count and the oldest unpublished row's age now; every
        MISSING_TOPIC_REPORT_S, also count (and warn about) rows waiting for missing topics."""
        async with self.pool.acquire() as conn:
            text, args = store.backlog()
            row = await conn.fetchrow(text, *args)
            self.backlog, self.oldest_age_s = int(row[0]), float(row[1])
            now = time.monotonic()
            if now >= self._next_missing_report and (
                self._holds.topics() or self.missing_topic_rows
            ):
                self._next_missing_report = now + MISSING_TOPIC_REPORT_S
                await report_missing(conn, self._holds, self)

    async def housekeeping(self) -> None:
        """Backlog figures and retention, each on its own timer. Needs the database only."""
        now = time.monotonic()
        if now >= self._next_backlog:
            self._next_backlog = now + self.backlog_interval_s
            try:
                await self.refresh_backlog()
            except Exception as exc:  # figures only: never a reason to stop publishing
                log.warning("relay: backlog figures: %s: %s", type(exc).__name__, exc)
        if now >= self._next_cleanup:
            await self._retention(now)

    async def _retention(self, now: float) -> None:
        # Until it succeeds, the next pass waits the interval too: retention is upkeep, and
        # a pass that fails every time (a permission, an overflow) must never stop the
        # publishing that follows it in the loop.
        self._next_cleanup = now + self.settings.cleanup_interval_s
        try:
            async with self.pool.acquire() as conn:
                purged = await retention.purge(conn, self.settings)
        except Exception as exc:
            self.errors += 1
            self.last_error = f"retention: {type(exc).__name__}: {exc}"
            log.warning("relay: %s; publishing goes on", self.last_error)
            return
        if not purged.finished:  # an unfinished pass continues on the next loop
            self._next_cleanup = now
        if purged.outbox or purged.inbox:
            log.info("retention: deleted %d outbox, %d inbox rows", purged.outbox, purged.inbox)
