"""The batch protocol of docs/design.md: one Redis round trip and one transaction per batch.

For the records of one partition, in order:

1. decode, validate and derive (namespace, key, hash); invalid records become dead letters;
2. coalesce copies of a key (in the batch, and across batches of this process);
3. one Redis call: done markers and leases; wait (bounded) for keys leased elsewhere;
4. one transaction: lock the partition's stored position, claim the inbox rows of the batch in
   one statement, run each handler in a savepoint, complete the rows, write the outbox rows
   and move the stored position forward;
5. after commit: done markers, lease release (one pipeline).

An indefinite failure stops the batch at that record: everything before it commits, nothing is
recorded for it or after it, and the caller re-reads the partition from there after a delay.
This module never talks to Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from consumer.db.tx import BatchTx
from consumer.dedup.accelerator import Accelerator
from consumer.dedup.leases import DoneMarker, LeaseResult, LeaseStore
from consumer.errors import is_retriable
from consumer.message import Message
from consumer.observers import Observer
from consumer.probe import Probe, installed
from consumer.runtime import poison
from consumer.runtime.invoke import Fallback, backoff_s
from consumer.runtime.items import Handlers, Item, parse
from consumer.runtime.outcomes import BatchCounts, BatchResult, Handled, Outcome
from consumer.runtime.replies import Replies
from consumer.runtime.transaction import BatchTransaction
from consumer.runtime.writes import Writes
from consumer.settings import Settings
from consumer.types import Ident

log = logging.getLogger("consumer.batch")

BeginTx = Callable[[], contextlib.AbstractAsyncContextManager[BatchTx]]


class BatchProcessor:
    """Runs batches of one app. One per worker process; safe for concurrent partitions."""

    def __init__(
        self,
        app: Handlers,
        settings: Settings,
        leases: LeaseStore,
        token: str,
        begin: BeginTx,
        *,
        probe: Probe | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.app = app
        self._begin = begin
        # The test seam (consumer/probe.py): the process-wide probe by default; the test
        # harness passes its own, so one harness's injected faults never reach another's.
        self.probe = probe or installed()
        # Told of every committed batch transaction (``committed``), before Redis and Kafka.
        self.observer = observer or Observer()
        self.replies = Replies(app.topics, settings.reply_copy_headers)
        self.settings = settings
        self.token = token
        self.redis = Accelerator(leases, settings, token)
        self.inflight: dict[Ident, asyncio.Future[None]] = {}
        self.attempts: dict[tuple[str, int, int], int] = {}
        self.unstorable: dict[tuple[str, int, int], int] = {}  # whole-batch refusals, alone
        self.refused_in_a_row: dict[tuple[str, int], int] = {}  # unstorable dead letters
        # Per partition, the stored position this worker last committed or sought to. The
        # stored position only moves forward except by `reset-positions` or a database that
        # lost transactions (restore, failover to a lagging replica): found behind this,
        # the partition is re-read from it, never continued from the fetch position.
        self.positions: dict[tuple[str, int], int] = {}
        # Partitions whose last optimistic batch fell back: batches left on savepoints.
        self.guarded: dict[tuple[str, int], int] = {}
        self.fallbacks = 0  # optimistic batches rolled back and run again with savepoints

    def forget(self, topic: str, partition: int) -> None:
        """Drop the attempt counts of a partition this worker no longer owns."""
        for counts in (self.attempts, self.unstorable):
            for pos in [p for p in counts if p[0] == topic and p[1] == partition]:
                del counts[pos]
        self.refused_in_a_row.pop((topic, partition), None)
        self.positions.pop((topic, partition), None)
        self.guarded.pop((topic, partition), None)

    def expect(self, topic: str, partition: int, position: int | None) -> None:
        """The worker sought ``partition`` to ``position``, read from the stored positions
        (None: the database had none, the partition starts at its log start)."""
        if position is None:
            self.positions.pop((topic, partition), None)
        else:
            self.positions[(topic, partition)] = position

    def parse(self, msg: Message) -> Item:
        """``msg`` decoded, validated and identified (runtime/items.py).

        Also how a record is run again after a run that was thrown away (an optimistic
        batch rolled back, a batch refused at a shared statement and run record by record, a
        batch handler's failed call): decoded again from its bytes, so a handler that
        changed its payload model in place does not hand the change to the run that counts.
        Only those paths pay for it; a deep copy per handler call would cost every message
        (``model_copy(deep=True)``: ~39 µs for the bench's PaymentRequested, a quarter of
        the batch path's client CPU per message, docs/benchmarks.md)."""
        s = self.settings
        return parse(msg, self.app, s.tenant_header, s.default_content_type)

    @property
    def leases(self) -> LeaseStore:
        return self.redis.store

    @leases.setter
    def leases(self, store: LeaseStore) -> None:
        self.redis.store = store

    @property
    def redis_degraded(self) -> bool:
        return self.redis.degraded

    @property
    def redis_failures(self) -> int:
        return self.redis.failures

    # ---------------------------------------------------------------- the batch

    async def process(self, records: Sequence[Message]) -> BatchResult:
        """Process records of one partition, in offset order. Never raises for a message."""
        if not records:
            return BatchResult()
        started = time.monotonic()
        items = [self.parse(m) for m in records]
        leaders: dict[Ident, Item] = {}
        for it in items:
            if it.ident is not None:
                leaders.setdefault(it.ident.ident, it)
        mine, busy = await self._coalesce(leaders)
        try:
            result = await self._route(items, leaders, busy)
        finally:
            for ident, fut in mine.items():
                if not fut.done():
                    fut.set_result(None)
                del self.inflight[ident]
        result.duration_s = time.monotonic() - started
        for h_ in result.handled:
            self.unstorable.pop((h_.message.topic, h_.message.partition, h_.message.offset), None)
        if any(h_.outcome is not Outcome.FAILED for h_ in result.handled):
            self.refused_in_a_row.pop((records[0].topic, records[0].partition), None)
        return result

    async def _coalesce(
        self, leaders: dict[Ident, Item]
    ) -> tuple[dict[Ident, asyncio.Future[None]], set[Ident]]:
        """Copies of a key another batch of this process is handling: await that result
        (bounded). Returns the keys this batch now handles, and those still busy."""
        deadline = time.monotonic() + self.settings.lease_wait_ms / 1000
        while others := [self.inflight[i] for i in leaders if i in self.inflight]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.wait(others, timeout=remaining)
        mine: dict[Ident, asyncio.Future[None]] = {}
        busy: set[Ident] = set()
        # One future for all of this batch's keys: they are decided by one commit.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for ident in leaders:
            if ident in self.inflight:
                busy.add(ident)
            else:
                mine[ident] = self.inflight[ident] = done
        return mine, busy

    async def _route(
        self, items: list[Item], leaders: dict[Ident, Item], busy: set[Ident]
    ) -> BatchResult:
        """The batch as one transaction, or record by record when a value of one of them
        was refused by a statement they share (runtime/poison.py)."""

        def alone(it: Item) -> Awaitable[BatchResult]:
            it = self.parse(it.msg)  # its payload as sent, whatever the batch run did to it
            one = {it.ident.ident: it} if it.ident else {}
            return self._process([it], one, {i for i in busy if i in one})

        first = items[0].msg
        if (first.topic, first.partition, first.offset) in self.unstorable:
            # Its last batch was refused on this record's value: it goes alone first.
            return await poison.isolate(items, alone, self._give_up)
        result = await self._process(items, leaders, busy)
        if not result.poisoned:
            return result
        if len(items) == 1:
            return await self._give_up(items[0], result)
        return await poison.isolate(items, alone, self._give_up)

    async def _process(
        self, items: list[Item], leaders: dict[Ident, Item], busy: set[Ident]
    ) -> BatchResult:
        idents = [i for i in leaders if i not in busy]
        states = dict(zip(idents, await self.redis.acquire(idents), strict=True))
        held = [i for i, s in states.items() if s.state == "held"]
        if held:
            states.update(await self.redis.wait_for_holders(held))
        acquired = [i for i, s in states.items() if s.state == "acquired"]
        busy |= {i for i, s in states.items() if s.state == "held"}

        renewed = BatchCounts()
        renewer = asyncio.create_task(self._renew(acquired, renewed)) if acquired else None
        done_markers: list[DoneMarker] = []
        try:
            await self.probe.point("before_transaction")
            try:
                result = await self._transact_optimistically(items, states, done_markers, busy)
            finally:
                await self.probe.point("after_transaction")
            await self.probe.point("after_commit")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The transaction failed as a whole (database down, commit outcome unknown):
            # nothing is assumed; the partition is re-read from its first record.
            kind = is_retriable(exc)
            log.warning(
                "batch from %s failed (%s: %s); retrying",
                items[0].msg.source,
                type(exc).__name__,
                exc,
                exc_info=kind is None,
            )
            result = BatchResult(
                retry_offset=items[0].msg.offset,
                retry_delay_s=self.settings.retry_backoff_ms / 1000,
                error=f"{type(exc).__name__}: {exc}",
                poisoned=poison.data_error(exc),
            )
            done_markers = []
        finally:
            if renewer is not None:
                renewer.cancel()
        await self.redis.finish(done_markers, acquired)
        result.redis_degraded = self.redis_degraded
        if self.settings.redis_mode == "on" and not self.redis_degraded:
            # Otherwise the "leases" were granted by a stand-in: nothing to count.
            result.counts.lease_acquired = len(acquired)
            result.counts.lease_contended = len(held)
            result.counts.lease_renewed = renewed.lease_renewed
        return result

    async def _give_up(self, it: Item, failed: BatchResult) -> BatchResult:
        """A record whose batch of one was refused on its data: retried with back-off, then
        dead-lettered as ``unstorable`` with nothing recorded under its key."""
        msg = it.msg
        pos = (msg.topic, msg.partition, msg.offset)
        n = self.unstorable[pos] = self.unstorable.get(pos, 0) + 1
        limit = (it.handler.max_attempts if it.handler else None) or self.settings.max_attempts
        if n < limit:
            failed.retry_delay_s = backoff_s(self.settings, n)
            return failed
        tp = (msg.topic, msg.partition)
        if self.refused_in_a_row.get(tp, 0) >= poison.MAX_IN_A_ROW:
            # Several records in a row refused alone: more likely the database (a migration
            # gone wrong) than the data. Stalling is the safe failure; an operator decides.
            log.error(
                "%s refused alone %d times, after %d records in a row were dead-lettered as "
                "unstorable: not dead-lettering more; the partition waits (%s)",
                msg.source,
                n,
                poison.MAX_IN_A_ROW,
                failed.error,
            )
            failed.retry_delay_s = backoff_s(self.settings, n)
            return failed
        try:
            done = await poison.dead_letter_alone(
                self._begin, self.app.group, msg, it.ident, f"unstorable ({n}): {failed.error}"
            )
        except Exception as exc:  # tried again at the next redelivery
            log.warning("dead-lettering %s failed (%s: %s)", msg.source, type(exc).__name__, exc)
            return failed
        self.unstorable.pop(pos, None)
        self.refused_in_a_row[tp] = self.refused_in_a_row.get(tp, 0) + 1
        return done

    async def _renew(self, idents: list[Ident], counts: BatchCounts) -> None:
        interval = self.settings.lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            counts.lease_renewed += await self.redis.renew(idents)

    # ---------------------------------------------------------------- the transaction

    async def _transact_optimistically(
        self,
        items: list[Item],
        states: dict[Ident, LeaseResult],
        done_markers: list[DoneMarker],
        busy: set[Ident],
    ) -> BatchResult:
        """The batch with handlers run without a savepoint each, unless its partition fell
        back recently; a run that does not end well rolls the whole transaction back
        (:class:`Fallback`) and the batch runs again with savepoints, exactly as before."""
        tp = (items[0].msg.topic, items[0].msg.partition)
        cooldown = self.guarded.get(tp, 0)
        if not self.settings.optimistic or cooldown > 0:
            if cooldown:
                self.guarded[tp] = cooldown - 1
            return await self._transact(items, states, done_markers, busy, optimistic=False)
        try:
            return await self._transact(items, states, done_markers, busy, optimistic=True)
        except Fallback as exc:
            log.debug("%s/%s: optimistic run fell back (%s)", *tp, exc)
            self.guarded[tp] = self.settings.optimistic_cooldown_batches
            self.fallbacks += 1
            # Decoded again: the rolled-back runs may have changed their payloads in place.
            items = [self.parse(it.msg) for it in items]
            return await self._transact(items, states, done_markers, busy, optimistic=False)

    async def _transact(
        self,
        items: list[Item],
        states: dict[Ident, LeaseResult],
        done_markers: list[DoneMarker],
        busy: set[Ident],
        *,
        optimistic: bool,
    ) -> BatchResult:
        """``busy``: keys still leased elsewhere after the bounded wait. They are not claimed;
        a committed record decides them (a holder that died after its commit leaves its lease
        behind until it expires), and the batch stops before the first one without a record.
        Records below the stored position are skipped before any of that."""
        first = items[0].msg
        tp = (first.topic, first.partition)
        async with self._begin() as tx:
            stored = await tx.lock_offset(self.app.group, *tp)
            if stored < self.positions.get(tp, -1):
                return self._moved_back(tp, stored)
            live = [it for it in items if it.msg.offset >= stored]
            writes = Writes(next_offset=live[-1].msg.offset + 1 if live else None)
            for it in items[: len(items) - len(live)]:
                writes.result.handled.append(Handled(it.msg, Outcome.SKIPPED))
            batch = BatchTransaction(
                tx,
                group=self.app.group,
                settings=self.settings,
                probe=self.probe,
                replies=self.replies,
                attempts=self.attempts,
                optimistic=optimistic and tx.optimistic,
                parse=self.parse,
            )
            leaders = {it.ident.ident: it for it in reversed(live) if it.ident}
            await batch.read(leaders, states, busy)
            counts = writes.result.counts
            counts.fast_path = len(batch.confirmed)
            counts.pg_path = len(leaders) - counts.fast_path
            try:
                await batch.walk(live, writes)
                await tx.send_deferred()  # ctx.db.defer's statements, before the outcomes
            except Exception as exc:
                if not optimistic or isinstance(exc, Fallback):
                    raise
                # Optimistic: a queued statement refused when sent (by the server, or by
                # asyncpg client-side, as an InterfaceError with no SQLSTATE for a wrong
                # argument count), whose it was is not known here. Run again with savepoints,
                # where it is that handler's error; a failure that is not the data's (the
                # database away) fails that run too and takes the usual path.
                raise Fallback(f"a deferred statement failed: {exc}") from exc
            await writes.flush(tx, self.app.group, *tp, stored, batch.unclaimed())
            done_markers += writes.markers
            if self.probe.markers_before_commit:
                # BROKEN BUILD (consumer/probe.py, scripts/chaos): markers before the commit,
                # the bug the chaos checker must catch.
                await self.redis.finish(done_markers, [])
            await self.probe.point("before_commit")
        result = writes.result
        if result.next_offset is not None:  # committed: the stored position now
            self.positions[tp] = result.next_offset
        for h_ in result.handled:
            self.attempts.pop((h_.message.topic, h_.message.partition, h_.message.offset), None)
        self.observer.committed(result)
        return result

    def _moved_back(self, tp: tuple[str, int], stored: int) -> BatchResult:
        log.warning(
            "stored position of %s/%s moved back from %d to %d (reset-positions, or the "
            "database restored or failed over): re-reading from it",
            *tp,
            self.positions[tp],
            stored,
        )
        del self.positions[tp]  # the worker's seek sets it again
        return BatchResult(moved_back=True)


@contextlib.asynccontextmanager
async def pg_transaction(pool: Any) -> AsyncIterator[BatchTx]:
    """A batch transaction on a pooled PostgreSQL connection."""
    from consumer.db.tx import PgTx

    async with pool.acquire() as conn, conn.transaction():
        yield PgTx(conn)
