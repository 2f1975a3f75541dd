"""One batch transaction: read what the stores know, decide each record, write once.

:class:`BatchTransaction` walks the live records of one partition batch in offset order:
``decide`` (runtime/decide.py) says what each one is, one arm per :class:`Decision` does it
(running the handler is one arm), and every write goes to a :class:`Writes` that is flushed
once, before COMMIT. The order of a run inside the transaction: lock the stored position, skip
records below it, claim the new keys and read every other record in one lookup, walk, flush
(docs/design.md, "The batch transaction").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from consumer import storable
from consumer.db.tx import BatchTx
from consumer.dedup.hashing import HASH_VERSION, marker_digest, parse_marker_digest
from consumer.dedup.inbox import Claim, Completion
from consumer.dedup.leases import DoneMarker, LeaseResult
from consumer.errors import InvalidMessage
from consumer.message import Message
from consumer.outbox import envelopes
from consumer.probe import Probe
from consumer.runtime import batch_run, retry_topics
from consumer.runtime.decide import Decision, Known, View, decide, wait_reason
from consumer.runtime.invoke import Run, run_handler
from consumer.runtime.items import Item
from consumer.runtime.outcomes import Handled, Outcome
from consumer.runtime.replies import Replies, reply_type
from consumer.runtime.writes import Writes
from consumer.settings import Settings
from consumer.types import Ident

log = logging.getLogger("consumer.transaction")

Position = tuple[str, int, int]  # topic, partition, offset


class BatchTransaction:
    """The records of one partition batch, inside one open transaction ``tx``."""

    def __init__(
        self,
        tx: BatchTx,
        *,
        group: str,
        settings: Settings,
        probe: Probe,
        replies: Replies,
        attempts: dict[Position, int],
        optimistic: bool = False,
        parse: Callable[[Message], Item] | None = None,
    ) -> None:
        self.tx = tx
        self.group = group
        self.settings = settings
        self.probe = probe
        self.replies = replies
        self.attempts = attempts  # the processor's: runs so far per record, across batches
        self.optimistic = optimistic  # handlers without a savepoint each (invoke.Fallback)
        self.view = View()
        self.confirmed: set[Ident] = set()  # Redis done markers the inbox agreed with
        self.prepared: dict[Position, Run] = {}  # a batch handler's runs (runtime/batch_run.py)
        self._parse = parse  # the processor's (runtime/batch.py): a record decoded again

    def redecode(self, it: Item) -> None:
        """Give ``it`` its payload decoded again from its record, for a run after one that
        was thrown away (a batch handler's failed call, runtime/batch_run.py)."""
        if self._parse is not None and (fresh := self._parse(it.msg)).ident is not None:
            it.ident = fresh.ident

    async def walk(self, live: list[Item], writes: Writes) -> None:
        """Decide and handle each live record in order, until one stops the batch. A batch
        handler is called first, once, for the records this walk will run."""
        self.prepared = await batch_run.prepare(self, live)
        await self._walk(live, writes)
        batch_run.check_taken(self.prepared)

    async def _walk(self, live: list[Item], writes: Writes) -> None:
        arms = {
            Decision.INVALID: self._invalid,
            Decision.FAILED_COPY: self._failed_copy,
            Decision.DUPLICATE: self._duplicate,
            Decision.CONFLICT: self._conflict,
        }
        for it in live:
            decision = decide(it.ident, self.view)
            if decision is Decision.RUN:
                go_on = await self._run(it, writes)
            elif decision is Decision.WAIT:
                go_on = self._wait(it, writes)
            elif decision is Decision.HALT:
                go_on = self._halt(it, writes)
            else:
                go_on = arms[decision](it, writes)
            if not go_on:
                return

    # ---------------------------------------------------------------- reading

    async def read(
        self, leaders: Mapping[Ident, Item], states: Mapping[Ident, LeaseResult], busy: set[Ident]
    ) -> None:
        """Claim the keys nobody decided, then read in one statement the records of the
        rest: claims that met a record, keys leased elsewhere (``busy``) and keys a Redis
        done marker calls decided. A marker whose key the inbox lacks (PostgreSQL restored
        or failed over, the key evicted, Redis restored from a snapshot) decides nothing:
        its key is claimed and run like a new one."""
        view = self.view
        view.busy = {i for i in leaders if i in busy}
        # A done marker says a key is decided; only the inbox may decide it. The marker
        # spares the claim; the record is read in the lookup the batch makes anyway.
        hinted = {i: s for i, s in states.items() if s.state == "done" and i in leaders}
        to_claim = [_claim(it) for i, it in leaders.items() if i not in hinted and i not in busy]
        view.claimed = await self.tx.claim(to_claim)
        lookup = [i for c in to_claim if (i := (c.namespace, c.key)) not in view.claimed]
        found = await self.tx.records([*lookup, *view.busy, *hinted])
        stale = [i for i in hinted if i not in found]
        if stale and self.probe.trust_markers:
            # BROKEN BUILD (consumer/probe.py, scripts/chaos): the marker is trusted as the
            # fence, the bug this method exists to prevent.
            for i in stale:
                digest, version = parse_marker_digest(hinted[i].hash)
                view.known[i] = Known(hinted[i].status, digest, version=version)
            stale = []
        if stale:
            log.warning(
                "%d Redis done marker(s) without an inbox record (database restored or failed "
                "over, key evicted, Redis restored?); claiming them as new: %s",
                len(stale),
                ", ".join(f"{ns}/{k}" for ns, k in stale[:5]),
            )
            again = await self.tx.claim([_claim(leaders[i]) for i in stale])
            view.claimed |= again
            found.update(await self.tx.records([i for i in stale if i not in again]))
        for i, rec in found.items():
            # In the result form, as the first copy's reply was built: every copy's reply is
            # byte-identical whatever jsonb made of the stored value.
            result = storable.stored_form(rec.result)
            view.known[i] = Known(
                rec.status, rec.hash, result, rec.reason, True, rec.hash_version, rec.reply_type
            )
        # Markers the inbox confirmed need no re-warm (they keep their own TTL).
        self.confirmed = {
            i
            for i, s in hinted.items()
            if i in view.known
            and (view.known[i].status, marker_digest(view.known[i].hash, view.known[i].version))
            == (s.status, s.hash)
        }

    # ---------------------------------------------------------------- the arms

    def _invalid(self, it: Item, w: Writes) -> bool:
        err = it.error or InvalidMessage("unknown")
        w.rows.append(envelopes.dead_letter(it.msg, err.reason, err.detail))
        w.result.handled.append(Handled(it.msg, Outcome.INVALID, reason=err.reason))
        return True

    def _failed_copy(self, it: Item, w: Writes) -> bool:
        # Copies later in the batch of a key whose run failed share the dead letter's fate.
        assert it.ident is not None
        ident, h = it.ident.ident, it.ident.hash
        why, detail = self.view.failed[ident]
        w.rows.append(envelopes.dead_letter(it.msg, why, detail, *ident))
        w.result.handled.append(Handled(it.msg, Outcome.FAILED, *ident, h, detail))
        return True

    def _duplicate(self, it: Item, w: Writes) -> bool:
        assert it.ident is not None
        ident, k = it.ident.ident, self.view.known[it.ident.ident]
        w.rows += self.replies.row(it.msg, ident, k)
        w.result.handled.append(
            Handled(it.msg, Outcome.DUPLICATE, *ident, it.ident.hash, k.status, k.result)
        )
        if ident not in self.view.processed and ident not in self.confirmed and k.has_result:
            # Re-warm Redis: the next copy is answered from the marker's lookup.
            w.markers.append(DoneMarker(*ident, k.status, marker_digest(k.hash, k.version)))
        return True

    def _conflict(self, it: Item, w: Writes) -> bool:
        assert it.ident is not None
        ident, h = it.ident.ident, it.ident.hash
        stored = self.view.known[ident].hash
        w.rows.append(envelopes.conflict(it.msg, ident[0], ident[1], h, stored))
        w.result.handled.append(
            Handled(it.msg, Outcome.CONFLICT, *ident, h, f"stored hash {stored}")
        )
        return True

    def _wait(self, it: Item, w: Writes) -> bool:
        # Neither claimed nor recorded: in flight elsewhere (lease still held), the row
        # vanished between claim and read (evicted), or written by a newer release.
        # Indefinite: stop here and look again after a delay.
        assert it.ident is not None
        delay_s = self.settings.retry_backoff_ms / 1000
        w.stop(it.msg.offset, delay_s, wait_reason(it.ident.ident, self.view))
        return False

    def _halt(self, it: Item, w: Writes) -> bool:
        # Pending rows exist only inside an open transaction; one visible here was committed
        # by a COMMIT behind ctx.db (the raw connection), with its handler run partly or not
        # at all. It decides nothing (answered as a duplicate, the key would never be
        # applied) and the framework cannot know its effects: the partition stops here.
        assert it.ident is not None
        log.error(
            "%s: inbox record %s/%s is 'pending' outside its transaction (a COMMIT on the raw "
            "connection?); its effects are unknown: check them, then `consumer evict` the key",
            it.msg.source,
            *it.ident.ident,
        )
        w.stop(
            it.msg.offset,
            self.settings.retry_backoff_max_ms / 1000,
            "inbox record left pending by a transaction ended behind ctx.db",
        )
        return False

    async def _run(self, it: Item, w: Writes) -> bool:
        assert it.handler is not None and it.ident is not None
        msg, ident, h = it.msg, it.ident.ident, it.ident.hash
        pos = (msg.topic, msg.partition, msg.offset)
        attempt = retry_topics.attempt_of(msg, self.attempts.get(pos, 0))
        run = self.prepared.pop(pos, None) or await run_handler(
            self.tx,
            it.handler,
            it.ident,
            msg,
            attempt=attempt,
            group=self.group,
            settings=self.settings,
            probe=self.probe,
            optimistic=self.optimistic,
        )
        w.result.counts.handler_s.append((it.handler.name, run.elapsed_s))
        if retry_topics.divert(it, run, attempt, self.settings, w):
            return True  # to <topic>.retry, nothing recorded: the partition moves on
        if run.status == "stop":
            if run.counted:
                self.attempts[pos] = attempt
            w.stop(msg.offset, run.delay_s, run.reason)
            return False
        if run.status == "failed":
            # Transient failures past max_attempts: a dead letter, and no record (the claim
            # is undone at flush), so a replay runs the handler again.
            self.view.failed[ident] = (run.dead_reason, run.reason)
            w.rows.append(
                envelopes.dead_letter(msg, run.dead_reason, run.reason, *ident, run.trace)
            )
            w.result.handled.append(Handled(msg, Outcome.FAILED, *ident, h, run.reason))
            return True
        self.view.processed.add(ident)
        # Chosen now, stored with the record: every later copy's reply has the same bytes.
        ct = reply_type(msg, it.handler.reply_content_type, self.settings.default_content_type)
        k = Known(run.status, h, run.result, run.reason, True, reply_type=ct)
        self.view.known[ident] = k
        w.completions.append(
            Completion(*ident, run.status, run.result_json, run.reason or None, ct)
        )
        w.markers.append(DoneMarker(*ident, run.status, marker_digest(h, HASH_VERSION)))
        w.rows += run.outgoing
        if run.status == "rejected":
            w.rows.append(envelopes.dead_letter(msg, "rejected", run.reason, *ident, run.trace))
        w.rows += self.replies.row(msg, ident, k, run.trace)
        outcome = Outcome.APPLIED if run.status == "done" else Outcome.REJECTED
        w.result.handled.append(Handled(msg, outcome, *ident, h, run.reason, run.result))
        return True

    def unclaimed(self) -> list[Ident]:
        """Claimed rows no run decided: deleted at flush, so the key stays free."""
        return [i for i in self.view.claimed if i not in self.view.processed]


def _claim(it: Item) -> Claim:
    assert it.ident is not None
    ns, key = it.ident.ident
    return Claim(ns, key, it.ident.hash, it.msg.topic, it.msg.partition, it.msg.offset)
