"""The batch protocol of DESIGN.md: one Redis round trip and one transaction per batch.

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
from dataclasses import dataclass
from typing import Any

from consumer import faults, storable
from consumer.app import App
from consumer.constants import CONFLICT_SUFFIX, DLQ_SUFFIX, HEADER_REPLY_TO
from consumer.db.tx import BatchTx
from consumer.dedup.accelerator import Accelerator
from consumer.dedup.hashing import HASH_VERSION, marker_digest, parse_marker_digest
from consumer.dedup.identity import Identity, identify
from consumer.dedup.inbox import Claim, Completion
from consumer.dedup.leases import DoneMarker, LeaseResult, LeaseStore
from consumer.errors import DecodeError, InvalidMessage, is_retriable
from consumer.handler import Handler
from consumer.message import Message
from consumer.outbox import envelopes
from consumer.outbox.store import OutboxRow
from consumer.runtime import poison
from consumer.runtime.invoke import backoff_s, run_handler
from consumer.runtime.outcomes import BatchCounts, BatchResult, Handled, Outcome
from consumer.settings import Settings

log = logging.getLogger("consumer.batch")

Ident = tuple[str, str]
BeginTx = Callable[[], contextlib.AbstractAsyncContextManager[BatchTx]]


@dataclass(slots=True)
class _Item:
    msg: Message
    handler: Handler[Any, Any] | None
    ident: Identity | None = None
    error: InvalidMessage | None = None


@dataclass(slots=True)
class _Known:
    """What the stores say about a key: status, hash and (when read from PostgreSQL) result."""

    status: str
    hash: str
    result: Any = None
    reason: str | None = None
    has_result: bool = False
    version: int = HASH_VERSION  # the canonical-form version ``hash`` was made with


class BatchProcessor:
    """Runs batches of one app. One per worker process; safe for concurrent partitions."""

    def __init__(
        self,
        app: App,
        settings: Settings,
        leases: LeaseStore,
        token: str,
        begin: BeginTx,
        fault: faults.Hook = faults.point,
    ) -> None:
        self.app = app
        self._begin = begin
        # Fault points go through this hook: the process-wide registry by default; the test
        # harness passes its own, so one harness's injected faults never reach another's.
        self._fault = fault
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

    def forget(self, topic: str, partition: int) -> None:
        """Drop the attempt counts of a partition this worker no longer owns."""
        for counts in (self.attempts, self.unstorable):
            for pos in [p for p in counts if p[0] == topic and p[1] == partition]:
                del counts[pos]
        self.refused_in_a_row.pop((topic, partition), None)
        self.positions.pop((topic, partition), None)

    def expect(self, topic: str, partition: int, position: int | None) -> None:
        """The worker sought ``partition`` to ``position``, read from the stored positions
        (None: the database had none, the partition starts at its log start)."""
        if position is None:
            self.positions.pop((topic, partition), None)
        else:
            self.positions[(topic, partition)] = position

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
        items = [self._parse(m) for m in records]
        leaders: dict[Ident, _Item] = {}
        for it in items:
            if it.ident is not None:
                leaders.setdefault(it.ident.ident, it)

        # Copies of a key being handled by another batch of this process: await that result.
        deadline = time.monotonic() + self.settings.lease_wait_ms / 1000
        while others := [self.inflight[i] for i in leaders if i in self.inflight]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.wait(others, timeout=remaining)
        mine: dict[Ident, asyncio.Future[None]] = {}
        busy: set[Ident] = set()
        for ident in leaders:
            if ident in self.inflight:
                busy.add(ident)
            else:
                mine[ident] = self.inflight[ident] = asyncio.get_running_loop().create_future()

        def alone(it: _Item) -> Awaitable[BatchResult]:
            one = {it.ident.ident: it} if it.ident else {}
            return self._process([it], one, {i for i in busy if i in one})

        first = items[0].msg
        try:
            if (first.topic, first.partition, first.offset) in self.unstorable:
                # Its last batch was refused on this record's value: it goes alone first.
                result = await poison.isolate(items, alone, self._give_up)
            else:
                result = await self._process(items, leaders, busy)
                if result.poisoned:  # refused on a record's value: find it (runtime/poison.py)
                    result = await (
                        self._give_up(items[0], result)
                        if len(items) == 1
                        else poison.isolate(items, alone, self._give_up)
                    )
        finally:
            for ident, fut in mine.items():
                fut.set_result(None)
                del self.inflight[ident]
        result.duration_s = time.monotonic() - started
        for h_ in result.handled:
            self.unstorable.pop((h_.message.topic, h_.message.partition, h_.message.offset), None)
        if any(h_.outcome is not Outcome.FAILED for h_ in result.handled):
            self.refused_in_a_row.pop((first.topic, first.partition), None)
        return result

    async def _process(
        self, items: list[_Item], leaders: dict[Ident, _Item], busy: set[Ident]
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
            result = await self._transact(items, states, done_markers, busy)
            await self._fault("after_commit")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The transaction failed as a whole (database down, commit outcome unknown):
            # nothing is assumed; the partition is re-read from its first record.
            kind = is_retriable(exc)
            log.warning(
                "batch %s/%s@%s failed (%s: %s); retrying",
                items[0].msg.topic,
                items[0].msg.partition,
                items[0].msg.offset,
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

    async def _give_up(self, it: _Item, failed: BatchResult) -> BatchResult:
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

    def _parse(self, msg: Message) -> _Item:
        handler = self.app.handler_for(msg.topic)
        if msg.undecodable:  # the Kafka client could not parse it: its raw bytes, dead
            return _Item(msg, handler, error=DecodeError(msg.undecodable))
        if handler is None:
            return _Item(msg, None, error=InvalidMessage(f"no handler for topic {msg.topic}"))
        try:
            s = self.settings
            ident = identify(handler, msg, s.tenant_header, s.default_content_type)
            return _Item(msg, handler, ident=ident)
        except InvalidMessage as exc:
            return _Item(msg, handler, error=exc)
        except Exception as exc:
            # A schema validator or key function that raises something pydantic does not wrap
            # must not take the worker down with every redelivery: a dead letter, as invalid.
            log.warning("identifying %s failed: %s: %s", msg.source, type(exc).__name__, exc)
            return _Item(msg, handler, error=InvalidMessage(f"{type(exc).__name__}: {exc}"))

    # ---------------------------------------------------------------- the transaction

    async def _transact(
        self,
        items: list[_Item],
        states: dict[Ident, LeaseResult],
        done_markers: list[DoneMarker],
        busy: set[Ident],
    ) -> BatchResult:
        """``busy``: keys still leased elsewhere after the bounded wait. They are not claimed;
        a committed record decides them (a holder that died after its commit leaves its lease
        behind until it expires), and the batch stops before the first one without a record.
        Records below the stored position are skipped before any of that."""
        result = BatchResult()
        if not items:
            return result
        first = items[0].msg
        group = self.app.group
        async with self._begin() as tx:
            stored = await tx.lock_offset(group, first.topic, first.partition)
            tp = (first.topic, first.partition)
            if stored < self.positions.get(tp, -1):
                log.warning(
                    "stored position of %s/%s moved back from %d to %d (reset-positions, or "
                    "the database restored or failed over): re-reading from it",
                    first.topic,
                    first.partition,
                    self.positions[tp],
                    stored,
                )
                del self.positions[tp]  # the worker's seek sets it again
                result.moved_back = True
                return result
            live = [it for it in items if it.msg.offset >= stored]
            for it in items[: len(items) - len(live)]:
                result.handled.append(Handled(it.msg, Outcome.SKIPPED))

            leaders = {it.ident.ident: it for it in reversed(live) if it.ident}
            # A done marker says a key is decided; only the inbox may decide it. The marker
            # spares the claim; the record is read in the lookup the batch makes anyway.
            hinted = {i: s for i, s in states.items() if s.state == "done" and i in leaders}
            claimed, known = await self._claim_and_read(
                tx,
                [it for i, it in leaders.items() if i not in hinted and i not in busy],
                [i for i in leaders if i in busy],
                hinted,
                leaders,
            )
            # Markers the inbox confirmed need no re-warm (they keep their own TTL).
            confirmed = {
                i
                for i, s in hinted.items()
                if i in known
                and (known[i].status, marker_digest(known[i].hash, known[i].version))
                == (s.status, s.hash)
            }
            result.counts.fast_path = len(confirmed)
            result.counts.pg_path = len(leaders) - result.counts.fast_path

            completions: list[Completion] = []
            rows: list[OutboxRow] = []
            next_offset = live[-1].msg.offset + 1 if live else None
            processed: set[Ident] = set()
            failed: dict[Ident, tuple[str, str]] = {}  # x-reason and detail, by key
            for it in live:
                msg = it.msg
                if it.ident is None:
                    err = it.error or InvalidMessage("unknown")
                    rows.append(envelopes.dead_letter(msg, err.reason, err.detail))
                    result.handled.append(Handled(msg, Outcome.INVALID, reason=err.reason))
                    continue
                ident, h = it.ident.ident, it.ident.hash
                k = known.get(ident)
                # A copy is compared under the canonical-form version its record was made
                # with (dedup/hashing.py), so records from before an upgrade keep answering.
                same = None if k is None else it.ident.same_payload(k.hash, k.version)
                if k is not None and same is None:
                    k = None  # a version this release does not know: stop, below
                if k is not None and k.status == "pending":
                    # Pending rows exist only inside an open transaction; one visible here
                    # was committed by a COMMIT behind ctx.db (the raw connection), with its
                    # handler run partly or not at all. It decides nothing (answered as a
                    # duplicate, the key would never be applied) and the framework cannot
                    # know its effects: the partition stops here for an operator.
                    log.error(
                        "%s: inbox record %s/%s is 'pending' outside its transaction (a "
                        "COMMIT on the raw connection?); its effects are unknown: check them, "
                        "then `consumer evict` the key",
                        msg.source,
                        *ident,
                    )
                    next_offset = msg.offset
                    result.retry_offset = msg.offset
                    result.retry_delay_s = self.settings.retry_backoff_max_ms / 1000
                    result.error = "inbox record left pending by a transaction ended behind ctx.db"
                    break
                if ident in failed:
                    why, detail = failed[ident]
                    rows.append(envelopes.dead_letter(msg, why, detail, *ident))
                    result.handled.append(Handled(msg, Outcome.FAILED, *ident, h, detail))
                elif k is None and ident in claimed and ident not in processed:
                    assert it.handler is not None
                    pos = (msg.topic, msg.partition, msg.offset)
                    attempt = self.attempts.get(pos, 0) + 1
                    run = await run_handler(
                        tx,
                        it.handler,
                        it.ident,
                        msg,
                        attempt=attempt,
                        group=group,
                        settings=self.settings,
                        fault=self._fault,
                    )
                    result.counts.handler_s.append((it.handler.name, run.elapsed_s))
                    if run.status == "stop":
                        if run.counted:
                            self.attempts[pos] = attempt
                        next_offset = msg.offset
                        result.retry_offset = msg.offset
                        result.retry_delay_s = run.delay_s
                        result.error = run.reason
                        break
                    if run.status == "failed":
                        # Transient failures past max_attempts: a dead letter, and no record
                        # (the claim is undone below), so a replay runs the handler again.
                        # Copies later in this batch share the dead letter's fate.
                        failed[ident] = (run.dead_reason, run.reason)
                        rows.append(
                            envelopes.dead_letter(
                                msg, run.dead_reason, run.reason, *ident, run.trace
                            )
                        )
                        result.handled.append(Handled(msg, Outcome.FAILED, *ident, h, run.reason))
                        continue
                    processed.add(ident)
                    known[ident] = _Known(run.status, h, run.result, run.reason, True)
                    completions.append(
                        Completion(
                            ident[0], ident[1], run.status, run.result_json, run.reason or None
                        )
                    )
                    done_markers.append(
                        DoneMarker(ident[0], ident[1], run.status, marker_digest(h, HASH_VERSION))
                    )
                    rows += run.outgoing
                    if run.status == "rejected":
                        rows.append(
                            envelopes.dead_letter(msg, "rejected", run.reason, *ident, run.trace)
                        )
                    self._reply(rows, msg, ident, known[ident], run.trace)
                    outcome = Outcome.APPLIED if run.status == "done" else Outcome.REJECTED
                    result.handled.append(Handled(msg, outcome, *ident, h, run.reason, run.result))
                elif k is not None and same:
                    self._reply(rows, msg, ident, k)
                    result.handled.append(
                        Handled(msg, Outcome.DUPLICATE, *ident, h, k.status, k.result)
                    )
                    if ident not in processed and ident not in confirmed and k.has_result:
                        done_markers.append(
                            DoneMarker(
                                ident[0], ident[1], k.status, marker_digest(k.hash, k.version)
                            )
                        )
                elif k is not None:
                    rows.append(envelopes.conflict(msg, ident[0], ident[1], h, k.hash))
                    result.handled.append(
                        Handled(msg, Outcome.CONFLICT, *ident, h, f"stored hash {k.hash}")
                    )
                else:
                    # Neither claimed nor recorded: in flight elsewhere (lease still held), or
                    # the row vanished between claim and read (evicted). Indefinite: stop here
                    # and look again after a delay.
                    next_offset = msg.offset
                    result.retry_offset = msg.offset
                    result.retry_delay_s = self.settings.retry_backoff_ms / 1000
                    result.error = (
                        "lease held by another worker"
                        if ident in busy
                        else "stored hash made with an unknown canonical-form version "
                        "(a newer release wrote it)"
                        if ident in known
                        else "inbox record changed under the batch"
                    )
                    break

            await tx.complete(completions)
            await tx.unclaim([i for i in claimed if i not in processed])
            await tx.outbox(rows)
            if next_offset is not None and next_offset > stored:
                await tx.advance_offset(group, first.topic, first.partition, next_offset)
                result.next_offset = next_offset
            if self.settings.unsafe_broken == "done_before_commit":
                # TEST-ONLY BROKEN BUILD (Settings.unsafe_broken, scripts/chaos): markers
                # before the commit, the bug the chaos checker must catch. Never enable.
                await self.redis.finish(done_markers, [])
            await self._fault("before_commit")
        if result.next_offset is not None:  # committed: the stored position now
            self.positions[(first.topic, first.partition)] = result.next_offset
        for h_ in result.handled:
            self.attempts.pop((h_.message.topic, h_.message.partition, h_.message.offset), None)
        return result

    async def _claim_and_read(
        self,
        tx: BatchTx,
        new: list[_Item],
        busy: list[Ident],
        hinted: dict[Ident, LeaseResult],
        leaders: dict[Ident, _Item],
    ) -> tuple[set[Ident], dict[Ident, _Known]]:
        """Claim ``new`` keys, then read in one statement the records of everything else:
        claims that met a record, keys leased elsewhere (``busy``) and keys a Redis done
        marker calls decided (``hinted``). A marker whose key the inbox lacks (PostgreSQL
        restored or failed over, the key evicted, Redis restored from a snapshot) decides
        nothing: its key is claimed and run like a new one. Returns (claimed, known)."""

        def claim_of(it: _Item) -> Claim:
            assert it.ident is not None
            ns, key = it.ident.ident
            return Claim(ns, key, it.ident.hash, it.msg.topic, it.msg.partition, it.msg.offset)

        to_claim = [claim_of(it) for it in new]
        claimed = await tx.claim(to_claim)
        lookup = [i for c in to_claim if (i := (c.namespace, c.key)) not in claimed]
        found = await tx.records([*lookup, *busy, *hinted])
        stale = [i for i in hinted if i not in found]
        trusted: dict[Ident, _Known] = {}
        if stale and self.settings.unsafe_broken == "done_before_commit":
            # TEST-ONLY BROKEN BUILD (Settings.unsafe_broken, scripts/chaos): the marker is
            # trusted as the fence, the bug this function exists to prevent. Never enable.
            for i in stale:
                digest, version = parse_marker_digest(hinted[i].hash)
                trusted[i] = _Known(hinted[i].status, digest, version=version)
            stale = []
        if stale:
            log.warning(
                "%d Redis done marker(s) without an inbox record (database restored or failed "
                "over, key evicted, Redis restored?); claiming them as new: %s",
                len(stale),
                ", ".join(f"{ns}/{k}" for ns, k in stale[:5]),
            )
            again = await tx.claim([claim_of(leaders[i]) for i in stale])
            claimed |= again
            found.update(await tx.records([i for i in stale if i not in again]))
        known = {
            # In the result form, as the first copy's reply was built: every copy's reply is
            # byte-identical whatever jsonb made of the stored value.
            i: _Known(
                rec.status,
                rec.hash,
                storable.stored_form(rec.result),
                rec.reason,
                True,
                rec.hash_version,
            )
            for i, rec in found.items()
        }
        return claimed, known | trusted

    def _reply(
        self,
        rows: list[OutboxRow],
        msg: Message,
        ident: Ident,
        k: _Known,
        trace: tuple[tuple[str, str], ...] | None = None,
    ) -> None:
        reply_to = msg.header_str(HEADER_REPLY_TO)
        if not reply_to or not k.has_result:
            return
        if not storable.valid_topic(reply_to):
            # The requester's mistake: no reply can go there. Written as a row, it would fail
            # the batch's outbox insert on every redelivery.
            log.warning("%s: reply-to %r is not a valid topic; no reply", msg.source, reply_to)
            return
        if reply_to in _fed_by_replies(self.app):
            # A reply there would be consumed by this app as a new message: a requester could
            # feed the app its own results (a loop through every reply-to it can set) or forge
            # dead letters that `consumer replay` re-drives.
            log.warning(
                "%s: reply-to %r is a topic this app consumes; no reply", msg.source, reply_to
            )
            return
        body = k.result if k.status == "done" else {"rejected": k.reason}
        try:
            rows.append(envelopes.reply(msg, reply_to, ident[0], ident[1], k.status, body, trace))
        except Exception as exc:
            # Only a record stored before results were checked (runtime/invoke.py) can get
            # here. Failing would fail the batch on every redelivery: no reply, and an error.
            log.error(
                "%s: the stored result of %s cannot be encoded as a reply (%s); no reply",
                msg.source,
                ident,
                storable.describe(exc),
            )


def _fed_by_replies(app: App) -> set[str]:
    """Topics a reply must never go to: the app's inputs and their dead-letter topics."""
    return {t + suffix for t in app.topics for suffix in ("", DLQ_SUFFIX, CONFLICT_SUFFIX)}


@contextlib.asynccontextmanager
async def pg_transaction(pool: Any) -> AsyncIterator[BatchTx]:
    """A batch transaction on a pooled PostgreSQL connection."""
    from consumer.db.tx import PgTx

    async with pool.acquire() as conn, conn.transaction():
        yield PgTx(conn)
