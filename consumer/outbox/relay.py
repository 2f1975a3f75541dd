"""The outbox relay: publishes committed outbox rows to Kafka, at least once, in order per key.

Each tick is one PostgreSQL transaction: take a few shards (transaction-scoped advisory
locks), read their oldest unpublished rows in id order, publish them with an idempotent
producer (``acks=all``), wait for the broker's acks, and only then mark the acked rows
published and commit. A crash anywhere before that commit leaves the rows pending; the next
tick (this relay or another) publishes them again with the same ``idempotency-key`` headers,
and a downstream consumer built with this framework applies them once.

A row the broker refuses holds back its destination key (a missing topic: the whole topic)
for a growing delay, so one poison row neither blocks other keys nor is overtaken by later
rows of its own key. A reply whose topic is still missing ``reply_topic_missing_s`` after it
was written is given up (the requester chose the topic); events and dead letters to a
missing topic stay pending, held and in the backlog figures, until the topic exists. Woken
by LISTEN/NOTIFY, with polling as the fallback. Between ticks it
refreshes the backlog figures and runs retention (consumer/outbox/retention.py).

It reads and writes ``dedup.outbox`` only (retention also expires ``dedup.inbox`` rows);
it never touches a handler's tables and never consumes from Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTimestampError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)

from consumer import faults, keys, metrics, tracing
from consumer.constants import HEADER_TRUNCATED, NOTIFY_CHANNEL, OUTBOX_SHARDS
from consumer.db.pool import create_pool
from consumer.kafka_config import client_options
from consumer.outbox import envelopes, retention, store
from consumer.outbox.store import Destination
from consumer.settings import Settings

log = logging.getLogger("consumer.relay")
_LOCK_BASE = 0x6F7574  # "out": advisory lock class of the outbox shards
_HOLD_KEY_S = (1.0, 60.0)  # first and longest hold of a key after a refused row
_NEW_TOPIC_WAIT_S = 10.0  # a new topic can take seconds to reach a fresh broker's metadata
_HOLD_TOPIC_S = (5.0, 300.0)  # first and longest hold of a topic the cluster does not have
_MAX_KEY_HOLDS = 1_000  # bound on the SQL arrays; beyond it rows are simply retried
GIVE_UP_REPLY_TOPIC_MISSING = "reply_topic_missing"  # given_up / metric reason
_REPLY_PREFIX = keys.KEY_TAG_REPLY + keys.PART_SEPARATOR  # every reply's idempotency key
_MAX_LOGGED_TOPICS = 10_000  # bound on the topics whose given-up replies were logged
# Errors about one message that no retry will cure. Anything else (timeouts, leader changes,
# a broker down) is transient: the row stays pending and the next tick sends it again.
_REFUSED = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    CorruptRecordException,
    InvalidTimestampError,
)
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)


class Sender(Protocol):
    """What the relay needs from a producer: an ``AIOKafkaProducer`` (or a subclass)."""

    client: Any  # for a fresh view of the cluster's topics when a topic does not resolve

    async def partitions_for(self, topic: str) -> Any: ...

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]: ...


class BrokerUnavailable(Exception):
    """Nothing in a tick was acknowledged and at least one failure was retriable."""


@dataclass(slots=True)
class _Hold:
    until: float
    failures: int


def _dest(row: Any) -> Destination:
    return (row["topic"], bytes(row["key"]) if row["key"] is not None else None)


def _headers(raw: Any) -> list[tuple[str, bytes]]:
    items = json.loads(raw) if isinstance(raw, str) else raw
    return [(str(k), str(v).encode()) for k, v in items]


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # A future we stopped waiting for may still fail later; retrieving its exception keeps
    # asyncio from logging "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


class Relay:
    """One relay. Several may run at once (in each worker, or as their own processes).

    Figures for operators and metrics: ``backlog`` (unpublished rows) and ``oldest_age_s``
    (age of the oldest one), refreshed every ``backlog_interval_s`` even while the broker is
    down; ``published``, ``failed`` (sends refused or not acked), ``out_of_order`` (a later row
    of a key acked while an earlier one failed), ``errors`` (ticks that failed as a whole),
    ``held`` (destinations currently held back).
    """

    def __init__(
        self,
        settings: Settings,
        pool: Any = None,
        shards_per_tick: int = 16,
        backlog_interval_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self._own_pool = pool is None
        self.shards_per_tick = shards_per_tick
        self.backlog_interval_s = backlog_interval_s
        self.wake = asyncio.Event()
        self.published = 0
        self.failed = 0
        self.out_of_order = 0
        self.errors = 0
        self.backlog = 0
        self.oldest_age_s = 0.0
        self.last_error = ""
        self.loops = 0  # completed passes of run(); lets a caller see the relay is idle
        self._holds: dict[Destination | str, _Hold] = {}
        self.truncated = 0  # dead letters sent without their value (too large)
        self._oversize: set[int] = set()  # ids of such rows not yet acked
        self._next_backlog = 0.0
        self._next_cleanup = 0.0
        self.given_up: dict[str, int] = {}  # rows given up, by reason (metric)
        self._absent: set[str] = set()  # topics found missing in the current tick
        self._logged_topics: set[str] = set()

    # ---------------------------------------------------------------- the loop

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until ``stop`` is set. Survives broker and database outages by retrying."""
        s = self.settings
        if self._own_pool:
            # Its own process (``consumer relay``): fault points apply here as in a worker.
            faults.configure(s.faults)
            self.pool = await create_pool(s.require_connections().postgres_dsn, max_size=3)
        producer: AIOKafkaProducer | None = None
        listener: Any = None
        failures = 0
        try:
            while not stop.is_set():
                metrics.record_relay(self)  # the figures of the previous pass
                # Cleared before the tick: a NOTIFY arriving during it wakes the next one.
                self.wake.clear()
                try:
                    listener = await self._ensure_listener(listener)
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
                    self.errors += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("relay: %s; retrying", self.last_error)
                    # Not woken by NOTIFY: with the broker down, every commit elsewhere would
                    # otherwise trigger another doomed attempt.
                    await self._sleep(stop, min(0.2 * 2 ** min(failures, 5), 5.0), wake=False)
                    continue
                if moved:
                    await asyncio.sleep(0)
                    continue
                await self._sleep(stop, s.relay_poll_ms / 1000)
        finally:
            if listener is not None:
                with contextlib.suppress(Exception):
                    await listener.close()
            if producer is not None:
                await self._stop_producer(producer, stopping=stop.is_set())
            if self._own_pool:
                await self.pool.close()
            log.info(
                "relay stopped: published=%d failed=%d out_of_order=%d errors=%d",
                self.published,
                self.failed,
                self.out_of_order,
                self.errors,
            )

    async def _stop_producer(self, producer: Any, *, stopping: bool) -> None:
        """Flush and close. When the relay is asked to stop, within a second: rows not acked
        yet are sent again by the next relay with the same keys, and an idempotent producer
        whose broker never acks would otherwise hold the worker's exit past its grace period
        (aiokafka retries such batches without expiring them)."""
        grace = 1.0 if stopping else self.settings.relay_publish_timeout_ms / 1000
        try:
            await asyncio.wait_for(producer.stop(), grace)
        except Exception as exc:
            log.warning("relay: producer did not stop cleanly (%s); closing it", type(exc).__name__)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.client.close(), 1.0)

    async def start_producer(self) -> AIOKafkaProducer:
        """A started idempotent producer (``acks=all``) configured from the settings."""
        s = self.settings
        producer = AIOKafkaProducer(
            **client_options(s),
            enable_idempotence=True,  # broker-side dedup of the producer's own retries
            acks="all",
            linger_ms=5,
            request_timeout_ms=s.relay_publish_timeout_ms,
        )
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        return producer

    async def _ensure_listener(self, listener: Any) -> Any:
        # A listener connection dropped by a database restart is replaced; until then the
        # polling interval is the fallback.
        if listener is not None and not listener.is_closed():
            return listener
        import asyncpg

        conn = await asyncpg.connect(self.settings.postgres_dsn)
        await conn.add_listener(NOTIFY_CHANNEL, lambda *_: self.wake.set())
        return conn

    async def _sleep(self, stop: asyncio.Event, seconds: float, wake: bool = True) -> None:
        waiters = [asyncio.ensure_future(stop.wait())]
        if wake:
            waiters.append(asyncio.ensure_future(self.wake.wait()))
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()

    # ---------------------------------------------------------------- one tick

    async def tick(self, producer: Sender) -> int:
        """Publish one round of rows; returns how many were acked and marked published."""
        blocked = self._blocked()
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
            text, args = store.claim_shards(_LOCK_BASE, start, self.shards_per_tick, blocked)
            shards = [r[0] for r in await conn.fetch(text, *args)]
            if not shards:
                return 0
            text, args = store.pending(shards, self.settings.relay_batch, blocked)
            rows = await conn.fetch(text, *args)
            if not rows:
                return 0
            self._absent = set()
            acked = await self._publish(producer, rows)
            await faults.point("relay_after_ack")
            if acked:
                text, args = store.mark_published(acked)
                await conn.execute(text, *args)
            if self._absent:
                await self._give_up_replies(conn, sorted(self._absent))
        self.published += len(acked)
        return len(acked)

    async def _publish(self, producer: Sender, rows: Sequence[Any]) -> list[int]:
        """Send rows in id order; return the ids the broker acknowledged."""
        missing = await self._missing_topics(producer, sorted({r["topic"] for r in rows}))
        sent = await self._send(producer, [r for r in rows if r["topic"] not in missing])
        if sent:
            timeout_s = self.settings.relay_publish_timeout_ms / 1000
            # This wait is the bound: with enable_idempotence aiokafka retries a batch without
            # expiring it, so an unacked future may never resolve (the row is simply sent again
            # by a later tick, with the same key).
            await asyncio.wait([f for _, f in sent], timeout=timeout_s + 5.0)
        return self._collect(sent)

    async def _missing_topics(self, producer: Sender, topics: list[str]) -> set[str]:
        """Topics whose rows cannot be sent this tick; the ones absent from the cluster are held.

        Topics the producer has not seen yet are looked up in ONE fresh metadata request
        first: a topic the cluster does not have is held at once, instead of costing a
        metadata timeout (``relay_publish_timeout_ms``) and delaying every other row of the
        shards taken this tick. A topic that merely failed to resolve while the broker is
        unreachable is not held (that would delay recovery): the tick fails as a whole instead.
        """
        unseen = [t for t in topics if producer.client.cluster.partitions_for_topic(t) is None]
        absent: set[str] = set()
        if unseen:
            try:
                cluster = await asyncio.wait_for(
                    producer.client.fetch_all_metadata(),
                    self.settings.relay_publish_timeout_ms / 1000,
                )
            except Exception as exc:
                raise BrokerUnavailable(
                    f"no cluster metadata: {type(exc).__name__}: {exc}"
                ) from exc
            listed = cluster.topics()
            # A topic created a moment ago may not be in that answer yet: give each unlisted
            # one a short wait of its own before holding it back.
            late = [t for t in unseen if t not in listed]
            found = await asyncio.gather(
                *(asyncio.wait_for(producer.partitions_for(t), _NEW_TOPIC_WAIT_S) for t in late),
                return_exceptions=True,
            )
            absent = {t for t, f in zip(late, found, strict=True) if isinstance(f, BaseException)}
            for topic in sorted(absent):
                self._hold(topic, _HOLD_TOPIC_S, f"topic {topic!r} does not exist")
            self._absent = absent
        present = [t for t in topics if t not in absent]
        meta = await asyncio.gather(
            *(producer.partitions_for(t) for t in present), return_exceptions=True
        )
        failed = {t for t, m in zip(present, meta, strict=True) if isinstance(m, BaseException)}
        for topic in present:
            if topic not in failed:
                self._holds.pop(topic, None)
        return absent | failed

    async def _send(
        self, producer: Sender, rows: Sequence[Any]
    ) -> list[tuple[Any, asyncio.Future[Any]]]:
        sent: list[tuple[Any, asyncio.Future[Any]]] = []
        refused: set[Destination] = set()
        for row in rows:
            dest = _dest(row)
            if dest in refused:
                continue  # never send a later row of a key past an earlier refused one
            # A span per row, a child of the handling span named in the row's headers.
            headers, span = tracing.publishing(dest[0], _headers(row["headers"]))
            value = bytes(row["value"])
            if row["id"] in self._oversize and (cut := envelopes.truncated(headers, len(value))):
                headers, value = cut, b""
            try:
                try:
                    fut = await producer.send(dest[0], value=value, key=dest[1], headers=headers)
                except _TOO_LARGE:
                    cut = envelopes.truncated(headers, len(value))
                    if cut is None or not value:
                        raise
                    # A dead letter too large to send (see envelopes.truncated): sent empty
                    # rather than held forever with every later dead letter of its key.
                    self._truncate(row["id"], len(value))
                    fut = await producer.send(dest[0], value=b"", key=dest[1], headers=cut)
            except _REFUSED as exc:
                # Refused by the client for this message alone: hold its key, go on.
                span.failed(exc)
                self.failed += 1
                refused.add(dest)
                self._hold(dest, _HOLD_KEY_S, f"row {row['id']}: {type(exc).__name__}: {exc}")
                continue
            fut.add_done_callback(_retrieve)
            fut.add_done_callback(span.done)
            sent.append((row, fut))
        return sent

    def _collect(self, sent: list[tuple[Any, asyncio.Future[Any]]]) -> list[int]:
        acked: list[int] = []
        last_acked: dict[Destination, int] = {}
        first_failed: dict[Destination, int] = {}
        transient = False
        for row, fut in sent:
            dest = _dest(row)
            err = fut.exception() if fut.done() and not fut.cancelled() else TimeoutError()
            if err is None:
                acked.append(row["id"])
                self._oversize.discard(row["id"])
                last_acked[dest] = row["id"]
                self._holds.pop(dest, None)
                continue
            self.failed += 1
            first_failed.setdefault(dest, row["id"])
            if isinstance(err, _TOO_LARGE) and envelopes.truncated(_headers(row["headers"]), 0):
                # Refused by the broker (its limit below the producer's): the next tick, after
                # the hold, sends the dead letter empty.
                self._truncate(row["id"], len(bytes(row["value"])))
                self._hold(dest, _HOLD_KEY_S, f"row {row['id']}: {type(err).__name__}: {err}")
            elif isinstance(err, _REFUSED):
                self._hold(dest, _HOLD_KEY_S, f"row {row['id']}: {type(err).__name__}: {err}")
            else:
                transient = True  # the row stays pending; the next tick sends it again
                self.last_error = f"row {row['id']}: {type(err).__name__}: {err}"
        for dest, failed_id in first_failed.items():
            if last_acked.get(dest, -1) > failed_id:
                # Only when the broker fails one message and accepts a later one of the same
                # partition in the same pipeline: counted and logged, never silent.
                self.out_of_order += 1
                log.error("relay: a later row of %r was acked after row %d failed", dest, failed_id)
        if transient and not acked:
            raise BrokerUnavailable(f"no ack for {len(sent)} row(s): {self.last_error}")
        return acked

    def _truncate(self, row_id: int, size: int) -> None:
        if row_id not in self._oversize:
            self._oversize.add(row_id)
            self.truncated += 1
            log.error(
                "relay: dead letter row %d (%d bytes) is too large to publish; sending it "
                "without its value (header %s)",
                row_id,
                size,
                HEADER_TRUNCATED,
            )

    async def _give_up_replies(self, conn: Any, topics: list[str]) -> None:
        """Give up the replies to ``topics`` (missing from the cluster) older than the bound.

        Any requester chooses its ``reply-to``; a reply to a topic nobody creates would stay
        pending forever (retention deletes only rows that left the outbox) and be re-checked
        after every hold. A requester has long stopped waiting (Spring Kafka's reply timeout
        is seconds), so the reply is given up: counted, logged once per topic, and deleted by
        retention. Events and dead letters are never given up: that would lose data.
        """
        reason = GIVE_UP_REPLY_TOPIC_MISSING
        text, args = store.give_up_replies(
            _LOCK_BASE, topics, self.settings.reply_topic_missing_s, _REPLY_PREFIX, reason
        )
        gone = [r[0] for r in await conn.fetch(text, *args)]
        if not gone:
            return
        self.given_up[reason] = self.given_up.get(reason, 0) + len(gone)
        if len(self._logged_topics) > _MAX_LOGGED_TOPICS:
            self._logged_topics.clear()
        for topic in sorted(set(gone) - self._logged_topics):
            self._logged_topics.add(topic)
            log.error(
                "relay: topic %r does not exist; gave up %d reply row(s) to it written more "
                "than %ds ago (given_up=%s); later ones are given up without logging again",
                topic,
                gone.count(topic),
                self.settings.reply_topic_missing_s,
                reason,
            )

    # ---------------------------------------------------------------- held destinations

    def _hold(self, what: Destination | str, delays: tuple[float, float], why: str) -> None:
        prev = self._holds.get(what)
        failures = prev.failures + 1 if prev else 1
        delay = min(delays[0] * 2 ** (failures - 1), delays[1])
        self._holds[what] = _Hold(time.monotonic() + delay, failures)
        self.last_error = why
        log.warning("relay: %s; holding it back %.0fs (failure %d)", why, delay, failures)

    def _blocked(self) -> store.Blocked:
        now = time.monotonic()
        live = [w for w, h in self._holds.items() if h.until > now]
        keys = [w for w in live if isinstance(w, tuple)][:_MAX_KEY_HOLDS]
        return store.Blocked([w for w in live if isinstance(w, str)], keys)

    @property
    def held(self) -> int:
        now = time.monotonic()
        return sum(1 for h in self._holds.values() if h.until > now)

    # ---------------------------------------------------------------- backlog and retention

    async def refresh_backlog(self) -> None:
        """Read the backlog count and the oldest unpublished row's age now."""
        async with self.pool.acquire() as conn:
            text, args = store.backlog()
            row = await conn.fetchrow(text, *args)
        self.backlog, self.oldest_age_s = int(row[0]), float(row[1])

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
