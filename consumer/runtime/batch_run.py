"""A batch handler's one call per batch transaction, before the walk, and its per-item runs.

:func:`prepare` runs before :meth:`BatchTransaction.walk <consumer.runtime.transaction>`
decides anything. It finds the records the walk will decide ``RUN`` (the first copy of each
claimed key, in offset order, up to the first record that stops the batch), calls the batch
handler once with all of them inside one savepoint, and turns its verdicts into one
:class:`~consumer.runtime.invoke.Run` per record. The walk's ``RUN`` arm then takes that run
instead of calling the handler, so every outcome, record, reply, dead letter, done marker and
outbox row is written by the same code as for a per-message handler.

Only a call that gives an exact outcome for every item is kept: values and ``Reject``. If it
raises, times out (``timeout_s`` bounds the whole call), marks any item ``Retry``, or yields a
result or a published message that cannot be stored, its savepoint is rolled back and nothing
is prepared: the walk runs each record alone in its own savepoint (the batch function with a
one-element list, consumer/batch_handler.py), so a stop at record *i* commits nothing of the
records after it. What this module must never do: keep effects of a call for a record the walk
does not reach. :func:`check_taken` fails the transaction if that ever happened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from consumer import codec, storable, tracing
from consumer.batch_handler import BatchContext, BatchHandler, Item, verdicts
from consumer.context import to_jsonable
from consumer.db.tx import BatchTx
from consumer.errors import Reject, Retry
from consumer.outbox import envelopes
from consumer.probe import Probe
from consumer.runtime.decide import Decision, Known, View, decide
from consumer.runtime.invoke import Run
from consumer.settings import Settings

if TYPE_CHECKING:
    from consumer.runtime import items

log = logging.getLogger("consumer.batch_run")

Position = tuple[str, int, int]


class BatchTransaction(Protocol):
    """What of runtime/transaction.py's BatchTransaction the pre-pass uses (a Protocol, so
    that the two modules do not import each other)."""

    tx: BatchTx
    settings: Settings
    probe: Probe
    group: str
    view: View
    attempts: dict[Position, int]

    def redecode(self, it: items.Item) -> None: ...


class _Fallback(Exception):
    """The call gave no exact outcome for some item: run them one at a time."""


def runnable(live: list[items.Item], view: View, handler: BatchHandler[Any]) -> list[items.Item]:
    """The records the walk will decide ``RUN``, assuming each run ends done or rejected.

    The walk on a copy of the view: a run makes its key known (later copies are duplicates or
    conflicts), and a record that waits or halts ends the walk, so nothing after it is
    prepared. A record of another handler ends it too (one partition is one topic; defensive).
    """
    sim = View(
        known=dict(view.known),
        claimed=view.claimed,
        busy=view.busy,
        processed=set(view.processed),
        failed=view.failed,
    )
    out: list[items.Item] = []
    for it in live:
        decision = decide(it.ident, sim)
        if decision in (Decision.WAIT, Decision.HALT):
            break
        if decision is not Decision.RUN:
            continue
        assert it.ident is not None
        if it.handler is not handler:
            break
        out.append(it)
        sim.processed.add(it.ident.ident)
        sim.known[it.ident.ident] = Known("done", it.ident.hash)
    return out


async def prepare(bt: BatchTransaction, live: list[items.Item]) -> dict[Position, Run]:
    """The runs of the batch handler's records, by position; empty: run them one by one."""
    handler = next((it.handler for it in live if it.handler is not None), None)
    if not isinstance(handler, BatchHandler):
        return {}
    chosen = runnable(live, bt.view, handler)
    if len(chosen) < 2:  # one record: the per-message path is the same call
        return {}
    batch: list[Item[Any]] = []
    for i, it in enumerate(chosen):
        assert it.ident is not None
        pos = (it.msg.topic, it.msg.partition, it.msg.offset)
        ident = it.ident
        attempt = bt.attempts.get(pos, 0) + 1
        batch.append(
            Item(ident.payload, ident.key, ident.namespace, it.msg, attempt, ident.hash, i)
        )
    started = time.monotonic()
    runs = await _call(bt, handler, chosen, batch)
    if not runs:
        # The runs one at a time get their payloads decoded again: the failed call may have
        # changed the models it was given in place (tests/integration/test_payload_reruns.py).
        for it in chosen:
            bt.redecode(it)
        return {}
    elapsed_s = (time.monotonic() - started) / len(chosen)
    out: dict[Position, Run] = {}
    for it, run in zip(chosen, runs, strict=True):
        run.elapsed_s = elapsed_s
        out[(it.msg.topic, it.msg.partition, it.msg.offset)] = run
    return out


async def _call(
    bt: BatchTransaction,
    handler: BatchHandler[Any],
    chosen: list[items.Item],
    batch: list[Item[Any]],
) -> list[Run]:
    """The call in its savepoint; ``[]`` when it must fall back (rolled back)."""
    tx = bt.tx
    ctx = BatchContext(tx.db, batch, handler.deps)  # the app's container (docs/lifespan.md)
    timeout_s = handler.timeout_s or bt.settings.handler_timeout_s
    await tx.savepoint()
    try:
        await bt.probe.point("mid_handler")
        value = await asyncio.wait_for(handler.fn(batch, ctx), timeout_s)
        # As on the per-message path, everything that can fail because of one item's result
        # happens before the savepoint is released, so that a failure falls back here rather
        # than failing the batch's shared statements.
        runs = [
            _run(bt, handler, it, one, ctx, v)
            for it, one, v in zip(chosen, batch, verdicts(ctx, value), strict=True)
        ]
        await tx.release_savepoint()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # the worker is being stopped
        await tx.rollback_savepoint()
        _fell_back(handler, len(batch), "the handler raised CancelledError")
        return []
    except Exception as exc:
        await tx.rollback_savepoint()
        why = "timed out" if isinstance(exc, TimeoutError) else storable.reason_text(exc)
        _fell_back(handler, len(batch), why)
        return []
    return runs


def _run(
    bt: BatchTransaction,
    handler: BatchHandler[Any],
    it: items.Item,
    one: Item[Any],
    ctx: BatchContext,
    verdict: Any,
) -> Run:
    """One item's run from its verdict, with the per-message path's checks; raises
    :class:`_Fallback` (or the check's error) when the item needs a run of its own."""
    if isinstance(verdict, Retry):
        raise _Fallback(f"item {one.index} marked Retry: {storable.reason_text(verdict)}")
    assert it.ident is not None
    settings = bt.settings
    with tracing.handling(it.msg, bt.group, handler, it.ident, settings.hash_keys_in_logs) as span:
        if isinstance(verdict, Reject):
            # Its publishes are dropped; its ctx.db writes cannot be (documented).
            run = Run("rejected", reason=storable.reason_text(getattr(verdict, "reason", verdict)))
        else:
            result = storable.result_form(to_jsonable(verdict))
            codec.encode(result)  # the reply of every copy can be built
            outgoing = envelopes.published(it.msg, one.namespace, one.key, ctx.outgoing(one))
            for row in outgoing:
                if (size := envelopes.row_size(row)) > envelopes.MAX_ROW_BYTES:
                    raise _Fallback(f"a message published to {row.topic!r} is {size} bytes")
            run = Run("done", result=result, outgoing=outgoing, result_json=json.dumps(result))
        span.finish(run.status, run.reason)
        run.trace = span.headers()
    return run


def _fell_back(handler: BatchHandler[Any], n: int, why: str) -> None:
    log.warning(
        "batch handler %s: the call for %d records was rolled back (%s); running them one at "
        "a time",
        handler.name,
        n,
        why,
    )


def check_taken(prepared: dict[Position, Run]) -> None:
    """Every prepared run was taken by the walk: otherwise effects of records it did not
    reach are in the transaction, which must then not commit (the batch is retried)."""
    if prepared:
        raise RuntimeError(
            f"batch handler runs prepared for {len(prepared)} record(s) the walk did not "
            "reach; the transaction is abandoned"
        )
