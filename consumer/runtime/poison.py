"""A batch that fails as a whole because of a value one record carries: find that record.

The runtime checks what it writes for each message while the message's savepoint is open
(consumer/storable.py), so a bad value is normally that message's own failure. This module is
the defence behind those checks: when a statement the whole batch shares is refused for a
*data* reason (SQLSTATE class 22, or a value the driver cannot encode), retrying the same
batch would fail the same way forever and stall the partition. Instead the records are
re-run one at a time: those before the culprit commit, and the culprit, failing alone
``max_attempts`` times, is dead-lettered as ``unstorable`` with nothing recorded under its key.

Other whole-batch failures (PostgreSQL down, a missing table, a revoked grant) say nothing
about a record; they are retried without limit and dead-letter nothing. So is a data error
that hits record after record: after ``MAX_IN_A_ROW`` unstorable dead letters in a row on a
partition, the next culprit is not dead-lettered and the partition waits for an operator.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

import asyncpg

from consumer.db.tx import BatchTx
from consumer.dedup.identity import Identity
from consumer.message import Message
from consumer.outbox import envelopes
from consumer.runtime.outcomes import BatchResult, Handled, Outcome

log = logging.getLogger("consumer.batch")

T = TypeVar("T")

# Dead-lettered as unstorable one after another on one partition, with nothing applied in
# between: beyond this, the cause is taken to be the database, and the partition waits.
MAX_IN_A_ROW = 3


def data_error(exc: BaseException) -> bool:
    """True if ``exc`` refuses a value (not a connection, a permission, a missing table)."""
    # asyncpg's client-side DataError (a value its codec cannot encode) is the only
    # InterfaceError that is also a ValueError; asyncpg.DataError is the server's class 22.
    if isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate.startswith("22")


async def isolate(
    items: Sequence[T],
    run_one: Callable[[T], Awaitable[BatchResult]],
    give_up: Callable[[T, BatchResult], Awaitable[BatchResult]],
) -> BatchResult:
    """Run ``items`` one at a time, in order, until one stops. ``give_up`` decides what a
    record failing alone on its data becomes (retried later, or dead-lettered)."""
    merged = BatchResult()
    for item in items:
        result = await run_one(item)
        if result.poisoned:
            result = await give_up(item, result)
        merged.merge(result)
        if result.retry_offset is not None or result.moved_back:
            break
    return merged


async def dead_letter_alone(
    begin: Callable[[], AbstractAsyncContextManager[BatchTx]],
    group: str,
    msg: Message,
    ident: Identity | None,
    reason: str,
) -> BatchResult:
    """One transaction: the record's dead letter and the partition's position past it."""
    ns, key, h = (ident.namespace, ident.key, ident.hash) if ident else ("", "", "")
    async with begin() as tx:
        stored = await tx.lock_offset(group, msg.topic, msg.partition)
        if msg.offset < stored:  # decided meanwhile, by another worker
            return BatchResult(handled=[Handled(msg, Outcome.SKIPPED)])
        await tx.outbox([envelopes.dead_letter(msg, "unstorable", reason, ns, key)])
        await tx.advance_offset(group, msg.topic, msg.partition, msg.offset + 1)
    log.error("%s dead-lettered as unstorable: %s", msg.source, reason)
    return BatchResult(
        handled=[Handled(msg, Outcome.FAILED, ns, key, h, reason)], next_offset=msg.offset + 1
    )
