"""The worker: one Kafka consumer in the app's group, feeding the batch processor.

Owns the fetch loop, Kafka offset commits (after the database commit, for lag tooling), the
rebalance listener (finish the batch in flight before giving partitions up; seek to the stored
positions on assignment), per-partition retry back-off, and a clean drain on stop.

Positions come from the database only. A partition without a stored position starts at its
log start; Kafka's committed offset (kept for lag tooling) is never read, since it can be ahead
of a database restored from a backup. A stored position the broker no longer has (beyond the
log end: the topic was deleted and re-created; before the log start: retention deleted
records never consumed) is never skipped: that partition is halted (paused, one error line,
``consumer_partition_halted``) until ``consumer reset-positions`` moves it; a halted
partition's stored position is re-read every ``HALT_RECHECK_S`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError, NoOffsetForPartitionError, OffsetOutOfRangeError

from consumer import faults, logs, metrics, topics
from consumer.app import App
from consumer.db import migrate
from consumer.db.pool import create_pool
from consumer.dedup.cluster import lease_store
from consumer.dedup.leases import LeaseStore, NoLeases
from consumer.kafka_config import client_options
from consumer.message import Message
from consumer.runtime import health, offsets, undecodable
from consumer.runtime.batch import BatchProcessor, pg_transaction
from consumer.runtime.outcomes import BatchResult
from consumer.runtime.stats import Stats
from consumer.settings import Settings

log = logging.getLogger("consumer.worker")

# How often a halted partition's stored position is read again (a reset resumes it).
HALT_RECHECK_S = 3.0


def to_message(rec: Any) -> Message:
    headers = tuple((k, bytes(v) if v is not None else b"") for k, v in (rec.headers or ()))
    bad = undecodable.reason_of(rec)
    return Message(
        rec.topic,
        rec.partition,
        rec.offset,
        rec.key,
        rec.value,
        headers,
        rec.timestamp or 0,
        bad.reason if bad else "",
    )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        # The batch in flight finishes (and commits) before the partitions are given up.
        async with self.worker.lock:
            self.worker.stats.rebalances += 1
            revoked = list(revoked)
            metrics.record_revoked(revoked)
            for tp in revoked:
                handle = self.worker.retry_tasks.pop(tp, None)
                if handle is not None:  # a stale timer must not resume it if it comes back
                    handle.cancel()
                if self.worker.processor is not None:
                    self.worker.processor.forget(tp.topic, tp.partition)
                self.worker.unhalt(tp)  # the new owner finds out for itself
                self.worker.stats.lag.pop(f"{tp.topic}/{tp.partition}", None)  # not ours now

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        # Under the lock: records fetched before the seek (the fetcher starts on the new
        # assignment while the stored positions are being read) wait, then meet the floor.
        async with self.worker.lock:
            await self.worker.seek_to_stored(list(assigned))


class Worker:
    """One consumer-group member. ``run()`` returns when ``stop`` is set and the drain is done."""

    def __init__(self, app: App, settings: Settings | None = None, worker_id: int = 0) -> None:
        self.app = app
        self.settings = settings or app.settings
        self.worker_id = worker_id
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.lock = asyncio.Lock()
        self.stats = Stats()
        self._status_last, self._status_t = 0, time.monotonic()
        self.retry_tasks: dict[TopicPartition, asyncio.TimerHandle] = {}
        # Stored position of each partition at assignment; records below it are stale.
        self.floor: dict[TopicPartition, int] = {}
        # Seeks per partition, and the last position sought: records a getmany() returns
        # after a seek made while it ran may come from the old position; they are dropped
        # and the partition is sought again, so they are fetched again from the right one.
        self.seeks: dict[TopicPartition, int] = {}
        self.sought: dict[TopicPartition, int] = {}
        # Partitions stopped at a stored position the broker does not have: (position, why).
        self.halted: dict[TopicPartition, tuple[int, str]] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self.pool: Any = None
        self.processor: BatchProcessor | None = None
        self.stop = asyncio.Event()
        self.started = asyncio.Event()
        self.relay: Any = None  # the in-worker outbox Relay: backlog, oldest_age_s, published

    async def seek_to_stored(self, tps: list[TopicPartition]) -> None:
        if not tps or self.consumer is None:
            return
        text, args = offsets.stored(self.app.group, [(tp.topic, tp.partition) for tp in tps])
        for attempt in itertools.count(1):  # without them no record may be processed
            try:
                rows = await self.pool.fetch(text, *args)
                break
            except Exception as exc:  # the database may be restarting
                if self.stop.is_set():
                    # Draining: nothing will be processed, and a record fetched from Kafka's
                    # older committed position is skipped by the batch's stored-offset check.
                    return
                log.warning("reading stored positions failed (%s); retry %d", exc, attempt)
                await asyncio.sleep(min(0.2 * attempt, 2.0))
        positions = {(r[0], r[1]): r[2] for r in rows}
        fresh = []
        for tp in tps:
            pos = positions.get((tp.topic, tp.partition))
            if self.processor is not None:
                self.processor.expect(tp.topic, tp.partition, pos)
            if pos is not None:
                self._seek(tp, pos)
                self.floor[tp] = pos
            else:
                self.floor.pop(tp, None)
                fresh.append(tp)
        if fresh:
            # Never consumed by this group (per the database): from the log start, whatever
            # offset Kafka has committed for the group.
            try:
                starts = await self.consumer.beginning_offsets(fresh)
            except Exception as exc:
                # No position is set: the fetcher raises NoOffsetForPartitionError (the
                # automatic reset is off) and _tick comes back here.
                log.warning("reading the log start of %d partitions failed: %s", len(fresh), exc)
                starts = {}
            for tp in fresh:
                if tp in starts:
                    self._seek(tp, starts[tp])
        assigned = self.consumer.assignment()
        self.stats.partitions = sorted(f"{tp.topic}/{tp.partition}" for tp in assigned)

    def _seek(self, tp: TopicPartition, pos: int) -> None:
        assert self.consumer is not None
        self.consumer.seek(tp, pos)
        self.seeks[tp] = self.seeks.get(tp, 0) + 1
        self.sought[tp] = pos

    async def halt(self, tp: TopicPartition, pos: int) -> None:
        """Stop ``tp`` at a stored position the broker does not have (never skip to another)."""
        assert self.consumer is not None
        if tp not in self.consumer.assignment():
            return
        self.consumer.pause(tp)
        if self.halted.get(tp, (None,))[0] == pos:
            return
        try:
            start = (await self.consumer.beginning_offsets([tp]))[tp]
            end = (await self.consumer.end_offsets([tp]))[tp]
        except Exception as exc:  # the reason is told without them
            start = end = -1
            log.warning("reading the log range of %s/%s failed: %s", tp.topic, tp.partition, exc)
        reason = "before_log_start" if 0 <= pos < start else "beyond_log_end"
        self.halted[tp] = (pos, reason)
        metrics.record_halted(tp.topic, tp.partition, reason, True)
        log.error(
            "partition %s/%s HALTED: stored position %d is %s (log start %d, log end %d); "
            "records there would be lost if skipped. Nothing is consumed from it until an "
            "operator runs `consumer reset-positions ... --topic %s --partition %d "
            "(--to-earliest | --to-offset N)`",
            tp.topic,
            tp.partition,
            pos,
            reason.replace("_", " "),
            start,
            end,
            tp.topic,
            tp.partition,
        )

    def unhalt(self, tp: TopicPartition) -> None:
        """Forget a halt (revoked, or moved by a reset); the metric follows."""
        halted = self.halted.pop(tp, None)
        if halted is not None:
            metrics.record_halted(tp.topic, tp.partition, halted[1], False)

    async def _recheck_halted(self) -> None:
        """Resume halted partitions whose stored position an operator has reset."""
        while True:
            await asyncio.sleep(HALT_RECHECK_S)
            if not self.halted or self.consumer is None:
                continue
            async with self.lock:
                tps = list(self.halted)
                text, args = offsets.stored(self.app.group, [(t.topic, t.partition) for t in tps])
                try:
                    rows = await self.pool.fetch(text, *args)
                except Exception as exc:  # tried again at the next interval
                    log.warning("re-reading stored offsets of halted partitions failed: %s", exc)
                    continue
                now = {(r[0], r[1]): r[2] for r in rows}
                for tp in tps:
                    pos = now.get((tp.topic, tp.partition))
                    if pos is None or pos == self.halted[tp][0]:
                        continue
                    log.warning(
                        "partition %s/%s resumed at stored position %d (was halted at %d)",
                        tp.topic,
                        tp.partition,
                        pos,
                        self.halted[tp][0],
                    )
                    self.unhalt(tp)
                    if tp in self.consumer.assignment():
                        if self.processor is not None:
                            self.processor.expect(tp.topic, tp.partition, pos)
                        self._seek(tp, pos)
                        self.floor[tp] = pos
                        self.consumer.resume(tp)

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
        faults.configure(s.faults)
        if not await topics.prepare_for_worker(self.app, s, self.stop):  # stopped meanwhile
            return
        # A batch transaction is idle between statements only while a handler awaits
        # something outside the database, which its timeout bounds: the longest of them
        # (a handler's own timeout_s may exceed the default), plus a margin.
        longest_s = max([h.timeout_s or s.handler_timeout_s for h in self.app.handlers] or [0.0])
        idle_ms = int(max(longest_s, s.handler_timeout_s) * 1000) + s.lease_ms
        self.pool = await create_pool(s.postgres_dsn, max_size=s.pg_pool_max, idle_in_tx_ms=idle_ms)
        try:
            await self._check_migrations()
        except BaseException:
            await self.pool.close()
            raise
        leases = await self._leases()
        self.processor = BatchProcessor(
            self.app, s, leases, self.token, lambda: pg_transaction(self.pool)
        )
        # One static identity per (host, slot): two machines running `--workers N` of one
        # group must not claim the same group.instance.id (the broker fences the older one).
        instance = (
            f"{self.app.group}-{socket.gethostname()}-{self.worker_id}"
            if s.static_membership
            else None
        )
        undecodable.install()
        self.consumer = AIOKafkaConsumer(
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
        self.consumer.subscribe(self.app.topics, listener=_Listener(self))
        await self.consumer.start()
        self._status_last, self._status_t = 0, time.monotonic()
        status = asyncio.create_task(self._status_loop())
        beat = asyncio.create_task(health.watch(self))  # the /healthz and /readyz gauges
        recheck = asyncio.create_task(self._recheck_halted())
        relay_task = None
        if s.relay_enabled:
            from consumer.outbox.relay import Relay

            self.relay = relay = Relay(s, pool=self.pool)
            relay_task = asyncio.create_task(relay.run(self.stop))
        self.started.set()
        try:
            while not self.stop.is_set():
                await self._tick()
        finally:
            status.cancel()
            beat.cancel()
            recheck.cancel()
            # The last counters, even for a worker stopped before its first interval.
            self._log_status()
            for handle in self.retry_tasks.values():
                handle.cancel()
            # Leave the group first: the partitions move now, not after the relay's drain.
            with contextlib.suppress(Exception):
                await self.consumer.stop()  # leaves the group
            if relay_task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    # Short: rows acked but not yet marked are simply sent again later,
                    # with the same idempotency keys.
                    await asyncio.wait_for(relay_task, 2)
            await leases.close()
            await self.pool.close()

    async def _tick(self) -> None:
        assert self.consumer is not None and self.processor is not None
        # Up to one batch per assigned partition: aiokafka fills max_records from one
        # partition's buffer first, so a single-batch fetch would leave the other partitions'
        # transactions idle while this one waits on PostgreSQL round trips.
        size = self.settings.batch_max_records
        seeks = dict(self.seeks)
        try:
            with undecodable.tolerant():  # unparseable records come out as stand-ins
                fetched = await self.consumer.getmany(
                    timeout_ms=self.settings.fetch_timeout_ms,
                    max_records=size * max(1, len(self.consumer.assignment())),
                )
        except OffsetOutOfRangeError as exc:
            async with self.lock:
                where = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
                for tp, pos in where.items():
                    await self.halt(tp, pos)
            return
        except NoOffsetForPartitionError as exc:
            # The fetcher looked for a position before seek_to_stored had set one.
            async with self.lock:
                tps = [tp for tp in exc.args if tp in self.consumer.assignment()]
                await self.seek_to_stored(tps)
            return
        if not fetched:
            return
        async with self.lock:
            assigned = self.consumer.assignment()
            for tp in fetched:
                if tp in assigned and self.seeks.get(tp) != seeks.get(tp):
                    self.consumer.seek(tp, self.sought[tp])
            work = {
                tp: live
                for tp, recs in fetched.items()
                if tp in assigned
                and self.seeks.get(tp) == seeks.get(tp)
                and (live := [r for r in recs if r.offset >= self.floor.get(tp, 0)])
            }
            per_tp = await asyncio.gather(*(self._partition(recs) for recs in work.values()))
            pairs = [(tp, r) for tp, results in zip(work, per_tp, strict=True) for r in results]
            results = [r for _, r in pairs]
            commit: dict[TopicPartition, int] = {}
            moved = [tp for tp, result in pairs if result.moved_back]
            if moved:  # re-read from the stored position (records fetched meanwhile dropped)
                await self.seek_to_stored(moved)
            for tp, result in pairs:
                self.stats.add(result)
                if result.next_offset is not None:
                    commit[tp] = result.next_offset
                if result.retry_offset is not None:
                    self._retry_later(tp, result)
            if commit:
                try:
                    # Bounded: with the broker away, commit would wait for a coordinator.
                    await asyncio.wait_for(self.consumer.commit(commit), 10)
                except (KafkaError, AssertionError, TimeoutError) as exc:
                    # The database holds the truth; Kafka's copy catches up on the next batch.
                    log.info("kafka offset commit skipped: %s", exc)
            for tp in work:
                with contextlib.suppress(Exception):
                    hw = self.consumer.highwater(tp)
                    pos = commit.get(tp) or 0
                    if hw is not None and pos:
                        self.stats.lag[f"{tp.topic}/{tp.partition}"] = max(0, hw - pos)
            # Metrics and per-message log lines: fed here only, from the results.
            metrics.record_tick(self.app, [tp for tp, _ in pairs], results, self.stats)
            logs.log_outcomes(results, self.settings.hash_keys_in_logs)

    async def _partition(self, recs: list[Any]) -> list[BatchResult]:
        """One partition's records, in order, as transactions of at most batch_max_records."""
        assert self.processor is not None
        size = self.settings.batch_max_records
        out: list[BatchResult] = []
        for start in range(0, len(recs), size):
            result = await self.processor.process(
                [to_message(r) for r in recs[start : start + size]]
            )
            out.append(result)
            if result.retry_offset is not None or result.moved_back:
                break  # the rest is re-read from the retry (or stored) position
        return out

    def _retry_later(self, tp: TopicPartition, result: BatchResult) -> None:
        assert self.consumer is not None and result.retry_offset is not None
        consumer = self.consumer
        consumer.seek(tp, result.retry_offset)
        consumer.pause(tp)
        log.info(
            "partition %s/%s paused %.2fs at offset %d: %s",
            tp.topic,
            tp.partition,
            result.retry_delay_s,
            result.retry_offset,
            result.error,
        )

        def resume() -> None:
            self.retry_tasks.pop(tp, None)
            if tp in consumer.assignment() and tp not in self.halted:
                consumer.resume(tp)

        self.retry_tasks[tp] = asyncio.get_running_loop().call_later(result.retry_delay_s, resume)

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
