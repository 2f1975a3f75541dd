"""Sending one tick's rows: in id order, a refused key held back, acks collected.

Errors about one message that no retry will cure (too large, corrupt) hold back that row's
key; anything else (timeouts, leader changes, a broker down) is transient: the row stays
pending and the next tick sends it again, with the same ``idempotency-key``. A dead letter
too large for the producer is sent without its value (consumer/outbox/envelopes.py
``truncated``) rather than held forever with every later dead letter of its key.

The span of each send comes from a hook (``PublishSpan``) the relay is given, so this
module knows nothing of tracing (docs/design.md, "Layers").
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from aiokafka.errors import (
    CorruptRecordException,
    InvalidTimestampError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)

from consumer.constants import HEADER_TRUNCATED
from consumer.outbox import envelopes, topics
from consumer.outbox.figures import Figures
from consumer.outbox.holds import HOLD_KEY_S, Holds
from consumer.outbox.producer import BrokerUnavailable, Sender
from consumer.outbox.store import Destination

log = logging.getLogger(__name__)
# Errors about one message that no retry will cure. Anything else is transient.
_REFUSED = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    CorruptRecordException,
    InvalidTimestampError,
)
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
Headers = list[tuple[str, bytes]]
Sent = list[tuple[Any, asyncio.Future[Any]]]


class Span(Protocol):
    """The span of one send, ended when the broker answers (consumer/tracing.py Publishing)."""

    def done(self, fut: Any) -> None: ...
    def failed(self, exc: BaseException) -> None: ...


# (topic, headers) -> (the headers to send, naming the span; the span)
PublishSpan = Callable[[str, Headers], tuple[Headers, Span]]


class _NoSpan:
    def done(self, fut: Any) -> None:
        return None

    def failed(self, exc: BaseException) -> None:
        return None


_NO_SPAN = _NoSpan()


def no_span(topic: str, headers: Headers) -> tuple[Headers, Span]:
    """A PublishSpan recording nothing: the row's trace headers go out as they are."""
    return headers, _NO_SPAN


def _dest(row: Any) -> Destination:
    return (row["topic"], bytes(row["key"]) if row["key"] is not None else None)


def _headers(raw: Any) -> Headers:
    items = json.loads(raw) if isinstance(raw, str) else raw
    return [(str(k), str(v).encode()) for k, v in items]


def _retrieve(fut: asyncio.Future[Any]) -> None:
    # A future we stopped waiting for may still fail later; retrieving its exception keeps
    # asyncio from logging "exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


def _why(row: Any, err: BaseException) -> str:
    return f"row {row['id']}: {type(err).__name__}: {err}"


class Publisher:
    """Sends rows and tells which were acked; counts into the relay's figures."""

    def __init__(
        self, figures: Figures, holds: Holds, publish_span: PublishSpan, timeout_s: float
    ) -> None:
        self._figures = figures
        self._holds = holds
        self._span = publish_span
        self._timeout_s = timeout_s
        self._oversize: set[int] = set()  # ids of dead letters to send empty, not yet acked

    async def publish(self, producer: Sender, rows: Sequence[Any]) -> tuple[list[int], set[str]]:
        """Send rows in id order; return the ids the broker acknowledged, and the topics
        found absent from the cluster (their replies may be given up)."""
        absent, failed = await topics.missing(
            producer, sorted({r["topic"] for r in rows}), self._holds, self._timeout_s
        )
        skip = absent | failed
        sent = await self._send(producer, [r for r in rows if r["topic"] not in skip])
        if sent:
            # This wait is the bound: with enable_idempotence aiokafka retries a batch without
            # expiring it, so an unacked future may never resolve (the row is simply sent again
            # by a later tick, with the same key).
            await asyncio.wait([f for _, f in sent], timeout=self._timeout_s + 5.0)
        return self._collect(sent), absent

    async def _send(self, producer: Sender, rows: Sequence[Any]) -> Sent:
        sent: Sent = []
        refused: set[Destination] = set()
        for row in rows:
            dest = _dest(row)
            if dest in refused:
                continue  # never send a later row of a key past an earlier refused one
            # A span per row, a child of the handling span named in the row's headers.
            headers, span = self._span(dest[0], _headers(row["headers"]))
            try:
                fut = await self._send_one(producer, row, dest, headers)
            except _REFUSED as exc:
                # Refused by the client for this message alone: hold its key, go on.
                span.failed(exc)
                self._figures.failed += 1
                refused.add(dest)
                self._holds.hold(dest, HOLD_KEY_S, _why(row, exc))
                continue
            fut.add_done_callback(_retrieve)
            fut.add_done_callback(span.done)
            sent.append((row, fut))
        return sent

    async def _send_one(
        self, producer: Sender, row: Any, dest: Destination, headers: Headers
    ) -> asyncio.Future[Any]:
        value = bytes(row["value"])
        if row["id"] in self._oversize and (cut := envelopes.truncated(headers, len(value))):
            headers, value = cut, b""
        try:
            return await producer.send(dest[0], value=value, key=dest[1], headers=headers)
        except _TOO_LARGE:
            cut = envelopes.truncated(headers, len(value))
            if cut is None or not value:
                raise
            # A dead letter too large to send (see envelopes.truncated): sent empty
            # rather than held forever with every later dead letter of its key.
            self._truncate(row["id"], len(value))
            return await producer.send(dest[0], value=b"", key=dest[1], headers=cut)

    def _collect(self, sent: Sent) -> list[int]:
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
                self._holds.release(dest)
                continue
            self._figures.failed += 1
            first_failed.setdefault(dest, row["id"])
            transient |= self._failed(row, dest, err)
        self._check_order(last_acked, first_failed)
        if transient and not acked:
            raise BrokerUnavailable(f"no ack for {len(sent)} row(s): {self._figures.last_error}")
        return acked

    def _failed(self, row: Any, dest: Destination, err: BaseException) -> bool:
        """One row not acked: hold its key if no retry will cure it; True if transient."""
        if isinstance(err, _TOO_LARGE) and envelopes.truncated(_headers(row["headers"]), 0):
            # Refused by the broker (its limit below the producer's): the next tick, after
            # the hold, sends the dead letter empty.
            self._truncate(row["id"], len(bytes(row["value"])))
            self._holds.hold(dest, HOLD_KEY_S, _why(row, err))
            return False
        if isinstance(err, _REFUSED):
            self._holds.hold(dest, HOLD_KEY_S, _why(row, err))
            return False
        # The row stays pending; the next tick sends it again.
        self._figures.last_error = _why(row, err)
        return True

    def _check_order(
        self, last_acked: dict[Destination, int], first_failed: dict[Destination, int]
    ) -> None:
        for dest, failed_id in first_failed.items():
            if last_acked.get(dest, -1) > failed_id:
                # Only when the broker fails one message and accepts a later one of the same
                # partition in the same pipeline: counted and logged, never silent.
                self._figures.out_of_order += 1
                log.error("relay: a later row of %r was acked after row %d failed", dest, failed_id)

    def _truncate(self, row_id: int, size: int) -> None:
        if row_id not in self._oversize:
            self._oversize.add(row_id)
            self._figures.truncated += 1
            log.error(
                "relay: dead letter row %d (%d bytes) is too large to publish; sending it "
                "without its value (header %s)",
                row_id,
                size,
                HEADER_TRUNCATED,
            )
