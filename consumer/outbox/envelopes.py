"""Outbox rows for every kind of outgoing message: published, reply, dead letter, conflict.

Every row carries an ``idempotency-key`` derived from where it came from, so a republish
(relay crash, batch retried) carries the same key and a downstream consumer built with this
framework applies it once. Rows caused by a handler call carry the trace context of its span
(consumer/tracing.py); without a recorded span, the consumed message's trace headers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from consumer import codec, keys, storable, tracing
from consumer.constants import (
    CONFLICT_SUFFIX,
    CONTENT_MSGPACK,
    DLQ_SUFFIX,
    HEADER_CONTENT_TYPE,
    HEADER_DETAIL,
    HEADER_HASH,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_KEY,
    HEADER_NAMESPACE,
    HEADER_OUTCOME,
    HEADER_REASON,
    HEADER_SOURCE,
    HEADER_STORED_HASH,
)
from consumer.context import Outgoing
from consumer.message import Message
from consumer.outbox.store import OutboxRow

_PASS_THROUGH = tracing.TRACE_HEADERS
Trace = Sequence[tuple[str, str]]


def _trace(msg: Message, trace: Trace | None) -> list[tuple[str, str]]:
    return list(trace) if trace is not None else tracing.outgoing(msg)


def _original_headers(msg: Message) -> list[tuple[str, str]]:
    # Header values are text on every path this framework writes; a binary value from a
    # foreign producer is kept as its hex form rather than dropped.
    # A NUL counts as binary too: the outbox stores headers as jsonb, which refuses it, and
    # the dead letter could then never be written.
    out = []
    for name, raw in msg.headers:
        name = storable.safe_text(name)
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            text = "\x00"
        out.append((name, text) if storable.text_ok(text) else (f"{name}.hex", raw.hex()))
    return out


# Headers the framework derives; a handler's own value for one of them is dropped, so the
# idempotency key downstream is always the derived one (a republish must carry the same key).
_DERIVED = {HEADER_IDEMPOTENCY_KEY, HEADER_SOURCE, *_PASS_THROUGH}


def published(msg: Message, namespace: str, key: str, items: list[Outgoing]) -> list[OutboxRow]:
    """Rows for what a handler published; the index makes each key unique within one handling.

    A retried handler runs again from scratch, so the same (namespace, key, index) names the
    same message every time it is produced; consumer/keys.py makes the name unambiguous.
    """
    rows = []
    trace = tracing.outgoing(msg)  # written inside the handling span: that span's context
    derived = _DERIVED | {name.lower() for name, _ in trace}
    for index, item in enumerate(items):
        if not all(storable.text_ok(n) and storable.text_ok(v) for n, v in item.headers):
            # Raised while the handler's savepoint is open, so it is the handler's error (a
            # bounded retry, then a dead letter) and not a batch that can never commit.
            raise ValueError(
                f"a header of the message to {item.topic!r} contains NUL or a lone surrogate"
            )
        ik = keys.published_key(namespace, key, index)
        headers = [
            *[(n, v) for n, v in item.headers if n.lower() not in derived],
            (HEADER_IDEMPOTENCY_KEY, ik),
            (HEADER_SOURCE, msg.source),
            *trace,
        ]
        rows.append(OutboxRow(item.topic, item.key, item.value, tuple(headers), ik))
    return rows


def reply(
    msg: Message,
    reply_to: str,
    namespace: str,
    key: str,
    status: str,
    body: Any,
    trace: Trace | None = None,
) -> OutboxRow:
    """The answer to a request; a duplicate request gets the same row (same idempotency key).

    ``trace``: the handling span's headers when the answer comes from a handler call.
    """
    ik = keys.reply_key(namespace, key)
    headers = (
        (HEADER_CONTENT_TYPE, CONTENT_MSGPACK),
        (HEADER_IDEMPOTENCY_KEY, ik),
        (HEADER_OUTCOME, status),
        (HEADER_NAMESPACE, namespace),
        (HEADER_KEY, key),
        (HEADER_SOURCE, msg.source),
        *_trace(msg, trace),
    )
    return OutboxRow(reply_to, key.encode(), codec.encode(body), headers, ik)


# The headers dead_letter() adds; consumer/replay.py removes them to send the original again.
DEAD_LETTER_HEADERS = frozenset(
    {HEADER_REASON, HEADER_DETAIL, HEADER_NAMESPACE, HEADER_KEY, HEADER_SOURCE}
)


def dead_letter(
    msg: Message,
    reason: str,
    detail: str,
    namespace: str = "",
    key: str = "",
    trace: Trace | None = None,
) -> OutboxRow:
    """The original bytes, untouched, with the reason in headers (a tombstone, which has no
    value, becomes an empty value: the outbox stores bytes).

    ``trace``: the span of the handler call that rejected it replaces the original trace
    headers, so the dead letter sits in the trace where it failed.
    """
    replaced = {HEADER_IDEMPOTENCY_KEY}
    if trace is not None:
        replaced |= {*_PASS_THROUGH, *(name.lower() for name, _ in trace)}
    headers = [
        *[(n, v) for n, v in _original_headers(msg) if n.lower() not in replaced],
        *(trace or ()),
        (HEADER_REASON, reason),
        (HEADER_DETAIL, storable.safe_text(detail[:1000])),
        (HEADER_NAMESPACE, namespace),
        (HEADER_KEY, key),
        (HEADER_SOURCE, msg.source),
        (HEADER_IDEMPOTENCY_KEY, f"dlq:{msg.source}"),
    ]
    original_ct = msg.header_str(HEADER_CONTENT_TYPE)
    if original_ct is None:
        headers.append((HEADER_CONTENT_TYPE, CONTENT_MSGPACK))
    return OutboxRow(
        msg.topic + DLQ_SUFFIX, msg.key, msg.value or b"", tuple(headers), f"dlq:{msg.source}"
    )


def conflict(
    msg: Message, namespace: str, key: str, payload_hash: str, stored_hash: str
) -> OutboxRow:
    """A reused key with a different payload: both hashes, never the stored result."""
    headers = [
        *[(n, v) for n, v in _original_headers(msg) if n.lower() != HEADER_IDEMPOTENCY_KEY],
        (HEADER_REASON, "conflict"),
        (HEADER_DETAIL, "idempotency key reused with a different payload"),
        (HEADER_NAMESPACE, namespace),
        (HEADER_KEY, key),
        (HEADER_HASH, payload_hash),
        (HEADER_STORED_HASH, stored_hash),
        (HEADER_SOURCE, msg.source),
        (HEADER_IDEMPOTENCY_KEY, f"conflict:{msg.source}"),
    ]
    if msg.header_str(HEADER_CONTENT_TYPE) is None:
        headers.append((HEADER_CONTENT_TYPE, CONTENT_MSGPACK))
    return OutboxRow(
        msg.topic + CONFLICT_SUFFIX,
        msg.key,
        msg.value or b"",
        tuple(headers),
        f"conflict:{msg.source}",
    )
