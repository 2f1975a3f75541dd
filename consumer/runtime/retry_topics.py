"""Retries that do not block: a handler with ``retry="topics"`` sends a transiently failed
message to ``<topic>.retry`` and lets its partition move on.

The pattern is Spring Kafka's non-blocking retries (``@RetryableTopic``,
https://docs.spring.io/spring-kafka/reference/retrytopic.html): the failed record is
forwarded with a back-off timestamp; the retry topic's consumer pauses the partition until
the head record is due (``KafkaBackoffAwareMessageListenerAdapter``), and Karafka's Delayed
Topics do the same by pausing, never sleeping (https://karafka.io/docs/Pro-Delayed-Topics).
What differs here is exactly-once: Spring's retry forward cannot join a container
transaction, while here the retry record is an **outbox row** in the batch's one transaction
(docs/design.md, invariant 1): the row, the partition's stored position and *no* inbox
record for the key commit together or not at all, so a crash anywhere loses nothing and
applies nothing twice, and the key stays unburned (invariant 5).

Three functions, one call site each:

- :func:`divert` (runtime/transaction.py, the ``RUN`` arm): a counted transient failure of
  such a handler becomes a retry row instead of a stop; lock contention (uncounted) and
  ``WAIT`` still retry in place.
- :func:`attempt_of` (same arm): a record of ``<topic>.retry`` runs as attempt
  ``x-retry-attempt``; the handler's ``max_attempts`` bounds the runs over all hops, and the
  last one's failure is the usual ``failed`` dead letter in ``<topic>.dlq``.
- :func:`hold_back` and :func:`arrived` (runtime/fetch.py): records of a retry partition are
  handed to the protocol only once due; at the first one not due the partition is sought
  back to it and paused until then. Arrived records get their original headers back and
  ``Message.retry_of``, so their dead letters and conflicts go to the source's topics.

This module never talks to Kafka itself and never waits inside a transaction.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from consumer import storable
from consumer.constants import (
    HEADER_ORIGINAL_HEADERS,
    HEADER_RETRY_ATTEMPT,
    HEADER_RETRY_DUE_MS,
    HEADER_RETRY_ORIGIN,
    HEADER_RETRY_REASON,
    MAX_BACKOFF_EXPONENT,
    RETRY_SUFFIX,
)
from consumer.errors import MAX_RETRY_DELAY_S
from consumer.handler import Handler
from consumer.message import Message
from consumer.outbox import envelopes
from consumer.outbox.store import OutboxRow
from consumer.runtime.items import Handlers, Item
from consumer.runtime.outcomes import Handled, Outcome
from consumer.runtime.writes import Writes
from consumer.settings import Settings

log = logging.getLogger("consumer.retry_topics")

RETRY_HEADERS = frozenset(
    {HEADER_RETRY_ATTEMPT, HEADER_RETRY_DUE_MS, HEADER_RETRY_ORIGIN, HEADER_RETRY_REASON}
)
_STRIPPED = RETRY_HEADERS | {HEADER_ORIGINAL_HEADERS}


def topic_backoff_s(settings: Settings, attempt: int) -> float:
    """The delay before the run after ``attempt`` (the n-th retry waits base * mult**(n-1))."""
    n = max(attempt, 1) - 1
    n = min(n, MAX_BACKOFF_EXPONENT)
    base = settings.retry_topic_backoff_ms * settings.retry_topic_backoff_multiplier**n
    return float(min(base, settings.retry_topic_backoff_max_ms)) / 1000


def origin_of(topic: str, handler: Handler[Any, Any] | None) -> str:
    """The source topic whose ``<source>.retry`` ``topic`` is ("" when it is not one)."""
    if handler is None or handler.retry != "topics" or not topic.endswith(RETRY_SUFFIX):
        return ""
    source = topic[: -len(RETRY_SUFFIX)]
    return source if source in handler.topics else ""


def attempt_of(msg: Message, runs_here: int) -> int:
    """The run number of ``msg``'s next run: the runs of this record so far (in place) plus
    one, counted from ``x-retry-attempt`` for a record of a retry topic (at least 2: it got
    there by failing). Headers of a source record are never read: a replayed dead letter
    starts afresh."""
    if not msg.retry_of:
        return runs_here + 1
    try:
        first = int(msg.header_str(HEADER_RETRY_ATTEMPT) or "")
    except ValueError:
        first = 2
    return max(first, 2) + runs_here


def divert(it: Item, run: Any, attempt: int, settings: Settings, w: Writes) -> bool:
    """For a ``retry="topics"`` handler whose run failed transiently with attempts left
    (``run`` is invoke.Run, status ``stop``, counted): write the retry row to ``w``, and the
    ``deferred`` outcome; nothing is recorded for the key (its claim is undone at flush).
    True when diverted; False leaves the run to the in-place path."""
    h = it.handler
    if h is None or h.retry != "topics" or run.status != "stop" or not run.counted:
        return False
    assert it.ident is not None
    msg, ident = it.msg, it.ident
    # Retry(delay_s) longer than the topic back-off wins; shorter ones get the back-off,
    # which is the point of leaving the partition: waiting costs nothing here.
    delay_s = max(float(run.delay_s), topic_backoff_s(settings, attempt))
    due_ms = int(time.time() * 1000 + delay_s * 1000)
    row = retry_row(msg, attempt + 1, due_ms, run.reason)
    if envelopes.row_size(row) > envelopes.MAX_ROW_BYTES:
        # The relay would refuse it on every tick and hold back its key: retried in place.
        log.warning("%s: too large for %s, retried in place", msg.source, row.topic)
        return False
    w.rows.append(row)
    w.result.handled.append(
        Handled(msg, Outcome.DEFERRED, *ident.ident, ident.hash, f"{row.topic}: {run.reason}")
    )
    return True


def retry_row(msg: Message, attempt: int, due_ms: int, reason: str) -> OutboxRow:
    """The original record (value, record key, headers) for ``<source>.retry``.

    Visible headers: the original ones as text (the idempotency key among them), without
    those of an earlier hop, plus the four ``x-retry-*``; ``x-original-headers`` holds the
    original headers exactly (binary values too), restored by :func:`arrived`. The record
    key is the original's, so retries of one key share a retry partition. The row's own
    idempotency key names the record it retries: a relay resend is the same retry twice,
    which the inbox then deduplicates."""
    source = msg.retry_of or msg.topic
    origin = (msg.header_str(HEADER_RETRY_ORIGIN) if msg.retry_of else None) or msg.source
    if not storable.text_ok(origin):
        # Read from the record (any producer's): one PostgreSQL cannot store as text would
        # fail the batch's outbox statement, and the retry would end an unstorable dead letter.
        origin = msg.source
    original = [(n, v) for n, v in msg.headers if n.lower() not in _STRIPPED]
    visible = []
    for name, raw in original:
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            continue
        if storable.text_ok(name) and storable.text_ok(text):
            visible.append((name, text))
    headers = (
        *visible,
        (HEADER_RETRY_ATTEMPT, str(attempt)),
        (HEADER_RETRY_DUE_MS, str(due_ms)),
        (HEADER_RETRY_ORIGIN, origin),
        (HEADER_RETRY_REASON, storable.safe_text(reason[:1000])),
        (HEADER_ORIGINAL_HEADERS, envelopes.pack_headers(original)),
    )
    ik = f"retry:{msg.source}"
    return OutboxRow(source + RETRY_SUFFIX, msg.key, msg.value or b"", headers, ik)


def arrived(app: Handlers, msgs: list[Message]) -> list[Message]:
    """``msgs`` of one partition; for a retry topic, each with its original headers (plus
    the ``x-retry-*`` ones) and ``retry_of`` set. Other topics: ``msgs`` unchanged."""
    if not msgs or not (source := origin_of(msgs[0].topic, app.handler_for(msgs[0].topic))):
        return msgs
    return [_restored(m, source) for m in msgs]


def _restored(msg: Message, source: str) -> Message:
    headers = msg.headers
    packed = msg.header_str(HEADER_ORIGINAL_HEADERS)
    if packed is not None:
        try:
            original = envelopes.unpack_headers(packed)
        except ValueError:
            original = None  # not written by this framework: the record's own headers
        if original is not None:
            own = [(n, v) for n, v in msg.headers if n.lower() in RETRY_HEADERS]
            headers = (*[(n, v) for n, v in original if n.lower() not in _STRIPPED], *own)
    return dataclasses.replace(msg, headers=tuple(headers), retry_of=source, _index={})


RetryLater = Callable[[Any, int, float, str], None]  # (tp, offset, delay_s, why)


def hold_back(
    app: Handlers, settings: Settings, work: dict[Any, list[Any]], retry_later: RetryLater
) -> dict[Any, list[Any]]:
    """``work`` (fetched records per partition) without the records of retry partitions
    that are not due yet: each such partition is sought back to its first record not due
    and paused until then (``retry_later``, the fetch loop's own pause); the due ones before
    it are processed now. See :func:`due_ms` for how far a record can hold its partition."""
    out: dict[Any, list[Any]] = {}
    now_ms = time.time() * 1000
    cap_ms = cap_s(settings) * 1000
    for tp, recs in work.items():
        if not origin_of(tp.topic, app.handler_for(tp.topic)):
            out[tp] = recs
            continue
        due = recs
        for i, rec in enumerate(recs):
            wait_ms = due_ms(rec, now_ms, cap_ms) - now_ms
            if wait_ms > 0:
                due = recs[:i]
                retry_later(tp, rec.offset, min(wait_ms, cap_ms) / 1000, "retry not due yet")
                break
        if due:
            out[tp] = due
    return out


def cap_s(settings: Settings) -> float:
    """The furthest after its write the framework ever makes a retry record due: the
    topic back-off's cap, or a longer ``Retry(delay_s)`` (clamped to MAX_RETRY_DELAY_S)."""
    return max(settings.retry_topic_backoff_max_ms / 1000, MAX_RETRY_DELAY_S)


def due_ms(rec: Any, now_ms: float, cap_ms: float) -> float:
    """When ``rec`` (a fetched record of a retry topic) is due, in wall-clock ms.

    Its ``x-retry-due-ms``, but never more than ``cap_ms`` after the record was written (its
    Kafka timestamp), since nothing else stops a due time far ahead (a record not written by
    the framework, a clock far off) from pausing its partition again after every capped
    pause. A record whose timestamp is itself further ahead than the cap (or that has none)
    has nothing to bound it by: due now, run early rather than hold the partition. An
    unreadable due time is due now too."""
    written = getattr(rec, "timestamp", None)
    if not isinstance(written, int) or written < 0 or written > now_ms + cap_ms:
        return 0.0
    return min(_header_due_ms(rec), written + cap_ms)


def _header_due_ms(rec: Any) -> float:
    for name, raw in rec.headers or ():
        if name.lower() == HEADER_RETRY_DUE_MS:
            try:
                due = float(bytes(raw).decode())  # a header without a value is None
            except (TypeError, ValueError):
                return 0.0  # unreadable: due now, so it cannot stall its partition
            return due if math.isfinite(due) else 0.0  # "inf", "nan", "1e999"
    return 0.0
