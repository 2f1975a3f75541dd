"""One handler call inside its savepoint, and what its outcome means.

A handler's return is a definite success; ``Reject`` and non-retriable errors are definite
failures; retriable errors stop the batch at this message (nothing recorded) until
``max_attempts`` is reached, after which the message is dead-lettered as ``failed`` and still
nothing is recorded: a transient failure never burns the key, so a replay of the dead letter
(or a later copy) runs the handler again, as NServiceBus's recoverability does. Lock
contention inside PostgreSQL (deadlock, serialization failure) is retried without counting an
attempt: it says nothing about the message, and a payment must not be dead-lettered because
two batches met.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from consumer import codec, storable, tracing
from consumer.constants import MAX_BACKOFF_EXPONENT
from consumer.context import Context, to_jsonable
from consumer.db.tx import BatchTx
from consumer.dedup.identity import Identity
from consumer.errors import Reject, Retry, is_retriable, retry_delay
from consumer.handler import Handler
from consumer.message import Message
from consumer.outbox import envelopes
from consumer.outbox.store import OutboxRow
from consumer.probe import Probe
from consumer.settings import Settings

log = logging.getLogger("consumer.invoke")

# serialization_failure, deadlock_detected: contention between transactions, not a property
# of the message.
_CONTENTION_SQLSTATES = frozenset({"40001", "40P01"})


class Fallback(Exception):
    """An optimistic run (no savepoint of its own) did not end well: the batch transaction is
    rolled back and run again with a savepoint per message (runtime/batch.py)."""


@dataclass(slots=True)
class Run:
    status: str  # "done" | "rejected" | "failed" | "stop"
    result: Any = None
    reason: str = ""
    outgoing: list[OutboxRow] = field(default_factory=list)
    delay_s: float = 0.0
    result_json: str | None = None
    trace: tuple[tuple[str, str], ...] | None = None  # the handling span, for later rows
    elapsed_s: float = 0.0
    counted: bool = True  # whether a "stop" used up one of the message's attempts
    dead_reason: str = "failed"  # the x-reason of a "failed" run's dead letter


def backoff_s(settings: Settings, attempt: int) -> float:
    """The in-place delay after run ``attempt``: base * 2**(attempt-1), capped. The exponent
    is capped first: ``attempt`` can come from a record (``x-retry-attempt``)."""
    n = min(max(attempt, 1) - 1, MAX_BACKOFF_EXPONENT)
    base = settings.retry_backoff_ms * 2**n
    return float(min(base, settings.retry_backoff_max_ms)) / 1000


async def run_handler(
    tx: BatchTx,
    handler: Handler[Any, Any],
    ident: Identity,
    msg: Message,
    *,
    attempt: int,
    group: str,
    settings: Settings,
    probe: Probe,
    optimistic: bool = False,
) -> Run:
    """Run one handler in its own span (consumer/tracing.py), timed for the metrics.

    ``optimistic``: without a savepoint of its own; anything but a clean success raises
    :class:`Fallback` (the batch is rolled back and run again with savepoints)."""
    started = time.monotonic()
    with tracing.handling(msg, group, handler, ident, settings.hash_keys_in_logs) as span:
        run = await _call(tx, handler, ident, msg, attempt, settings, probe, optimistic)
        span.finish(run.status, run.reason)
        run.trace = span.headers()
    run.elapsed_s = time.monotonic() - started
    return run


def _finished(msg: Message, ident: Identity, value: Any, ctx: Context) -> Run:
    """The run of a handler that returned ``value``, checked while its savepoint is open.

    Everything that can fail because of this message's result happens here, before the
    savepoint is released, so it takes the per-message (bounded) path. Failing later, at the
    batch's shared statements, would re-run the batch without limit. The result form
    (consumer/storable.py) is what is stored and what every copy's reply is encoded from;
    encoding it here proves the reply can be built."""
    result = storable.result_form(to_jsonable(value))
    codec.encode(result)
    result_json = json.dumps(result)
    outgoing = envelopes.published(msg, ident.namespace, ident.key, ctx.outgoing)
    for row in outgoing:  # too large, it would be refused by the relay on every tick
        if (size := envelopes.row_size(row)) > envelopes.MAX_ROW_BYTES:
            raise storable.Unstorable(
                f"a message published to {row.topic!r} is {size} bytes, more than the "
                f"relay can send ({envelopes.MAX_ROW_BYTES})"
            )
    return Run("done", result=result, outgoing=outgoing, result_json=result_json)


async def _begin(tx: BatchTx, optimistic: bool) -> None:
    if optimistic:
        tx.watch()  # a statement error the handler swallows is seen, as with a savepoint
    else:
        await tx.savepoint()


async def _keep(tx: BatchTx, optimistic: bool) -> None:
    if not optimistic:
        await tx.release_savepoint()
    elif not tx.clean():
        raise Fallback("a statement of the handler failed")


async def _undo(tx: BatchTx, optimistic: bool, why: str) -> None:
    """Undo a call that did not end well. Optimistic, there is no savepoint: a call that sent
    nothing on ``ctx.db`` left nothing to undo (its publishes are dropped with its context,
    its deferred statements from the queue),
    any other makes the whole batch run again with savepoints (:class:`Fallback`)."""
    if not optimistic:
        await tx.rollback_savepoint()
    elif tx.touched():
        raise Fallback(why)
    else:
        tx.drop_deferred()  # queued by ``ctx.db.defer``, never sent: nothing to undo


async def _call(
    tx: BatchTx,
    handler: Handler[Any, Any],
    ident: Identity,
    msg: Message,
    attempt: int,
    settings: Settings,
    probe: Probe,
    optimistic: bool,
) -> Run:
    """The call, in its savepoint or (``optimistic``) watched without one; anything the
    optimistic run cannot undo raises :class:`Fallback` (runtime/batch.py)."""
    ctx = Context(tx.db, ident.namespace, ident.key, msg, ident.hash, attempt)
    timeout_s = handler.timeout_s or settings.handler_timeout_s
    await _begin(tx, optimistic)
    try:
        await probe.point("mid_handler")
        value = await asyncio.wait_for(handler.invoke(ident.payload, ctx), timeout_s)
        run = _finished(msg, ident, value, ctx)
        await _keep(tx, optimistic)
    except Fallback:
        raise
    except storable.Unstorable as exc:
        # Definite, and not the handler's doing to retry: the same code returns the same
        # value. Dead-lettered at once as unstorable, nothing recorded (the key stays free
        # for a fixed handler and a replay).
        await _undo(tx, optimistic, "unstorable result")
        return Run("failed", reason=storable.reason_text(str(exc)), dead_reason="unstorable")
    except Reject as exc:
        await _undo(tx, optimistic, "Reject")
        # A subclass may skip Reject.__init__ or reassign .reason: made text again here, as
        # a TypeError in this branch would fail the whole batch on every redelivery.
        return Run("rejected", reason=storable.reason_text(getattr(exc, "reason", exc)))
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # the worker is being stopped: not the message's failure
        # The handler raised CancelledError itself: its error, not a reason to stop the worker.
        await _undo(tx, optimistic, "the handler raised CancelledError")
        error = RuntimeError("the handler raised CancelledError")
        return _classify(error, handler, attempt, settings)
    except Exception as exc:
        await _undo(tx, optimistic, type(exc).__name__)
        return _classify(_cause(exc, tx), handler, attempt, settings)
    return run


def _cause(exc: Exception, tx: BatchTx) -> Exception:
    """The error to classify: for "current transaction is aborted" (25P02, a later statement
    or the savepoint's RELEASE after the handler swallowed an error), the swallowed error.
    A deadlock caught and ignored is still a deadlock: transient, never a burned key."""
    if getattr(exc, "sqlstate", None) != "25P02":
        return exc
    first = getattr(tx.db, "first_error", None)
    return first if isinstance(first, Exception) else exc


def _classify(exc: Exception, handler: Handler[Any, Any], attempt: int, settings: Settings) -> Run:
    described = storable.reason_text(exc)
    if getattr(exc, "sqlstate", None) in _CONTENTION_SQLSTATES:
        return Run("stop", reason=described, delay_s=backoff_s(settings, attempt), counted=False)
    retriable = is_retriable(exc, handler.retry_on)
    if retriable is None:
        retriable = handler.on_error == "retry"
        log.exception("handler %s raised %s", handler.name, described)
    if not retriable:
        return Run("rejected", reason=f"error: {described}")
    max_attempts = handler.max_attempts or settings.max_attempts
    if attempt >= max_attempts:
        # Not a definite outcome: a dead letter, and nothing recorded (the key stays free),
        # unless the settings ask for DESIGN.md's original rule (recorded as rejected).
        reason = f"attempts_exhausted ({attempt}): {described}"
        return Run(settings.exhausted_outcome, reason=reason)
    delay = retry_delay(exc.delay_s) if isinstance(exc, Retry) else None
    return Run(
        "stop", reason=described, delay_s=backoff_s(settings, attempt) if delay is None else delay
    )
