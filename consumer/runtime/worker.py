"""The worker: one Kafka consumer in the app's group, feeding the batch processor.

Its lifecycle lives here: connect (pool, migrations check, Redis), the app's startup hooks,
join the group, run the fetch loop (runtime/fetch.py) until ``stop``, then drain: leave the
group, let the in-worker relay finish, close, and the app's shutdown hooks. The rebalance
listener (runtime/rebalance.py) finishes the batch in flight before partitions go; positions
come from the database only (runtime/positions.py).
Metrics and logs are observers (consumer/observers.py) given to it, never called from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer import health, topics, tracing
from consumer.app import App
from consumer.db import migrate
from consumer.db.pool import create_pool
from consumer.dedup.cluster import lease_store
from consumer.dedup.leases import LeaseStore, NoLeases
from consumer.errors import ShutdownFailed
from consumer.kafka_config import client_options
from consumer.lifespan import Lifespan
from consumer.observers import Observer
from consumer.probe import Probe, installed
from consumer.runtime import undecodable
from consumer.runtime.batch import BatchProcessor, pg_transaction
from consumer.runtime.fetch import FetchLoop, to_message
from consumer.runtime.positions import HALT_RECHECK_S, Positions
from consumer.runtime.rebalance import RebalanceListener
from consumer.runtime.stats import Stats
from consumer.settings import Settings

__all__ = ["HALT_RECHECK_S", "Worker", "to_message", "tune_gc"]

log = logging.getLogger("consumer.worker")


def tune_gc() -> None:
    """For a worker process (``consumer run``): its long-lived objects (modules, the app,
    clients) leave the collector's generations, and young collections run less often. The
    collector cost 10-15 us per message in issue 15's profile; the runtime relies on no
    cycle being collected promptly."""
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


class Worker:
    """One consumer-group member. ``run()`` returns when ``stop`` is set and the drain is done.

    ``observer`` hears the runtime's events (metrics, logs: consumer/telemetry.py builds the
    standard set); ``probe`` is the test seam (consumer/probe.py), the process-wide one if
    not given.
    """

    def __init__(
        self,
        app: App,
        settings: Settings | None = None,
        worker_id: int = 0,
        *,
        observer: Observer | None = None,
        probe: Probe | None = None,
    ) -> None:
        self.app = app
        self.settings = settings or app.settings
        self.worker_id = worker_id
        self.observer = observer or Observer()
        self.probe = probe or installed()
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.lock = asyncio.Lock()
        self.stats = Stats()
        self._status_last, self._status_t = 0, time.monotonic()
        self.retry_tasks: dict[TopicPartition, asyncio.TimerHandle] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self.pool: Any = None
        self.processor: BatchProcessor | None = None
        self._positions: Positions | None = None
        self.stop = asyncio.Event()
        self.started = asyncio.Event()
        self.relay: Any = None  # the in-worker outbox Relay: backlog, oldest_age_s, published

    @property
    def positions(self) -> Positions:
        assert self._positions is not None, "the worker is not running"
        return self._positions

    @property
    def halted(self) -> dict[TopicPartition, tuple[int, str]]:
        """Partitions stopped at a stored position the broker does not have."""
        return self._positions.halted if self._positions is not None else {}

    async def seek_to_stored(self, tps: list[TopicPartition]) -> None:
        """Seek ``tps`` to their stored positions (the log start where there is none)."""
        if not tps or self.consumer is None:
            return
        await self.positions.seek_to_stored(tps)
        self.stats.partitions = sorted(
            f"{tp.topic}/{tp.partition}" for tp in self.consumer.assignment()
        )

    def unhalt(self, tp: TopicPartition) -> None:
        """Forget a halt (revoked, or moved by a reset); the metric follows."""
        self.positions.unhalt(tp)

    async def _leases(self) -> LeaseStore:
        if self.settings.redis_mode == "off":
            return NoLeases()
        epoch = await self.pool.fetchval("SELECT value FROM dedup.meta WHERE name = 'epoch'")
        return lease_store(self.settings.redis_url, self.settings.redis_cluster, str(epoch or ""))

    async def _check_migrations(self) -> None:
        # An applied file edited since means the schema is not what the code expects:
        # refuse to start (MigrationMismatch) rather than process records against it.
        async with self.pool.acquire() as conn:
            pending = await migrate.verify(conn, self.app.migrations)
        if pending:
            log.warning(
                "migrations not applied yet: %s; run `consumer migrate`", ", ".join(pending)
            )

    async def run(self) -> None:
        s = self.settings.require_connections()  # "" would let a client pick its own default
        # A batch transaction is idle between statements only while a handler awaits
        # something outside the database, which its timeout bounds: the longest of them
        # (a handler's own timeout_s may exceed the default), plus a margin.
        longest_s = max([h.timeout_s or s.handler_timeout_s for h in self.app.handlers] or [0.0])
        idle_ms = int(max(longest_s, s.handler_timeout_s) * 1000) + s.lease_ms
        self.pool = await create_pool(s.postgres_dsn, max_size=s.pg_pool_max, idle_in_tx_ms=idle_ms)
        try:
            await self._check_migrations()
            # After the schema check: a worker stopped while waiting for its topics must
            # still have refused an edited migration (RET_MIGRATION), not exited cleanly.
            ready = await topics.prepare_for_worker(self.app, s, self.stop)
        except BaseException:
            await self.pool.close()
            raise
        if not ready:  # stopped meanwhile: nothing left open
            await self.pool.close()
            self.pool = None
            return
        # The app's startup hooks, before anything consumes (consumer/lifespan.py); a hook
        # that raises ends the start here (StartupFailed, exit code RET_STARTUP).
        lifespan = Lifespan(self.app)
        try:
            self.app = await lifespan.start()
        except BaseException:
            await self.pool.close()
            raise
        # The shutdown hooks after the drain, also on SIGTERM; a hook's failure (ShutdownFailed)
        # never hides the error that ended the run.
        try:
            await self._consume(s)
        except BaseException:
            with contextlib.suppress(ShutdownFailed):
                await lifespan.stop()
            raise
        await lifespan.stop()

    async def _consume(self, s: Settings) -> None:
        leases = await self._leases()
        self.processor = BatchProcessor(
            self.app,
            s,
            leases,
            self.token,
            lambda: pg_transaction(self.pool),
            probe=self.probe,
            observer=self.observer,
        )
        self.consumer = self._consumer(s)
        self._positions = Positions(
            self.consumer,
            self.pool,
            self.app.group,
            self.processor.expect,
            self.observer,
            self.stop,
        )
        self.consumer.subscribe(self.app.subscribed, listener=RebalanceListener(self))
        await self.consumer.start()
        try:
            await self._serve(s)
        finally:
            await leases.close()
            await self.pool.close()

    def _consumer(self, s: Settings) -> AIOKafkaConsumer:
        # One static identity per (host, slot): two machines running `--workers N` of one
        # group must not claim the same group.instance.id (the broker fences the older one).
        instance = (
            f"{self.app.group}-{socket.gethostname()}-{self.worker_id}"
            if s.static_membership
            else None
        )
        undecodable.install()
        return AIOKafkaConsumer(
            **client_options(s),
            group_id=self.app.group,
            group_instance_id=instance,
            enable_auto_commit=False,
            # Every position is set by seek_to_stored; an out-of-range one must raise (and
            # halt the partition), never be reset to another offset behind our back.
            auto_offset_reset="none",
            isolation_level=s.kafka_isolation_level,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            max_poll_interval_ms=s.max_poll_interval_ms,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )

    async def _serve(self, s: Settings) -> None:
        """The fetch loop until ``stop``, then the drain."""
        assert self.consumer is not None
        self._status_last, self._status_t = 0, time.monotonic()
        status = asyncio.create_task(self._status_loop())
        beat = asyncio.create_task(health.watch(self))  # the /healthz and /readyz gauges
        recheck = asyncio.create_task(self.positions.recheck_halted(self.lock))
        relay_task = None
        if s.relay_enabled:
            from consumer.outbox.relay import Relay

            self.relay = relay = Relay(
                s,
                pool=self.pool,
                observers=self.observer,
                publish_span=tracing.publishing,
                probe=self.probe,
            )
            relay_task = asyncio.create_task(relay.run(self.stop))
        self.started.set()
        loop = FetchLoop(self)
        try:
            while not self.stop.is_set():
                await loop.tick()
        finally:
            status.cancel()
            beat.cancel()
            recheck.cancel()
            # The last counters, even for a worker stopped before its first interval.
            self._log_status()
            for handle in self.retry_tasks.values():
                handle.cancel()
            await loop.drain()  # Kafka's copy of the positions, for lag tooling
            # Leave the group first: the partitions move now, not after the relay's drain.
            with contextlib.suppress(Exception):
                await self.consumer.stop()  # leaves the group
            if relay_task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    # Short: rows acked but not yet marked are simply sent again later,
                    # with the same idempotency keys.
                    await asyncio.wait_for(relay_task, 2)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.status_interval_s)
            self._log_status()

    def _log_status(self) -> None:
        """One status line: the counters, and the rate since the previous line."""
        now = time.monotonic()
        rate = (self.stats.consumed - self._status_last) / max(now - self._status_t, 1e-9)
        self._status_last, self._status_t = self.stats.consumed, now
        log.info(
            "worker %d %s",
            self.worker_id,
            self.stats.line(rate),
            extra={"status": self.stats.fields(rate)},
        )
