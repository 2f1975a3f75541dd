"""Outbox rows for every kind of outgoing message: published, reply, dead letter, conflict.

Every row carries an ``idempotency-key`` derived from where it came from, so a republish
(relay crash, batch retried) carries the same key and a downstream consumer built with this
framework applies it once. Rows caused by a handler call carry the trace context of its span
(consumer/propagation.py; the span is consumer/tracing.py's); without a recorded span, the
consumed message's trace headers.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import msgpack
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from consumer import keys, propagation, storable
from consumer.codecs.registry import encode_for
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
    HEADER_ORIGINAL_HEADERS,
    HEADER_OUTCOME,
    HEADER_REASON,
    HEADER_SOURCE,
    HEADER_STORED_HASH,
    HEADER_TRUNCATED,
)
from consumer.context import Outgoing
from consumer.message import Message
from consumer.outbox.store import OutboxRow

_PASS_THROUGH = propagation.TRACE_HEADERS
Trace = Sequence[tuple[str, str]]


def _trace(msg: Message, trace: Trace | None) -> list[tuple[str, str]]:
    return list(trace) if trace is not None else propagation.outgoing(msg)


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


def _stamped(item: Outgoing, ik: str, source: str, trace: Trace) -> OutboxRow:
    """``item`` as a row: its own headers minus the derived ones, then the derived ones.

    Shared by handler output and :class:`consumer.Outbox` rows, so both carry one envelope.
    """
    if not all(storable.text_ok(n) and storable.text_ok(v) for n, v in item.headers):
        # For a handler: raised while its savepoint is open, so it is the handler's error (a
        # bounded retry, then a dead letter) and not a batch that can never commit.
        raise ValueError(
            f"a header of the message to {item.topic!r} contains NUL or a lone surrogate"
        )
    derived = _DERIVED | {name.lower() for name, _ in trace}
    headers = [
        *[(n, v) for n, v in item.headers if n.lower() not in derived],
        (HEADER_IDEMPOTENCY_KEY, ik),
        (HEADER_SOURCE, source),
        *trace,
    ]
    return OutboxRow(item.topic, item.key, item.value, tuple(headers), ik)


def published(msg: Message, namespace: str, key: str, items: list[Outgoing]) -> list[OutboxRow]:
    """Rows for what a handler published; the index makes each key unique within one handling.

    A retried handler runs again from scratch, so the same (namespace, key, index) names the
    same message every time it is produced; consumer/keys.py makes the name unambiguous.
    """
    trace = propagation.outgoing(msg)  # written inside the handling span: that span's context
    return [
        _stamped(item, keys.published_key(namespace, key, index), msg.source, trace)
        for index, item in enumerate(items)
    ]


def written(source: str, key: str, item: Outgoing) -> OutboxRow:
    """A row written by application code in its own transaction (:class:`consumer.Outbox`).

    ``idempotency-key`` is ``<source>:<key>`` (consumer/keys.py), ``x-source`` the source
    name, and the trace headers those of the current span if one is recorded.
    """
    return _stamped(item, keys.written_key(source, key), source, propagation.current())


def reply(
    msg: Message,
    reply_to: str,
    namespace: str,
    key: str,
    status: str,
    body: Any,
    trace: Trace | None = None,
    *,
    content_type: str = CONTENT_MSGPACK,
    copied: Sequence[tuple[str, str]] = (),
) -> OutboxRow:
    """The answer to a request; a duplicate request gets the same row (same idempotency key).

    ``trace``: the handling span's headers when the answer comes from a handler call.
    ``content_type``: the one chosen at the record's completion (runtime/replies.py), so the
    value is the same bytes for every copy. ``copied``: the request's own headers to send
    back (its correlation id); one named like a header set here is left out.
    """
    ik = keys.reply_key(namespace, key)
    own = (
        (HEADER_CONTENT_TYPE, content_type),
        (HEADER_IDEMPOTENCY_KEY, ik),
        (HEADER_OUTCOME, status),
        (HEADER_NAMESPACE, namespace),
        (HEADER_KEY, key),
        (HEADER_SOURCE, msg.source),
    )
    trace_headers = _trace(msg, trace)
    taken = {n for n, _ in own} | {n.lower() for n, _ in trace_headers}
    headers = (
        *own,
        *trace_headers,
        *((n, v) for n, v in copied if n.lower() not in taken),
    )
    return OutboxRow(reply_to, key.encode(), encode_for(content_type, body), headers, ik)


# The headers dead_letter() adds; consumer/replay.py removes them to send the original again.
DEAD_LETTER_HEADERS = frozenset(
    {
        HEADER_REASON,
        HEADER_DETAIL,
        HEADER_NAMESPACE,
        HEADER_KEY,
        HEADER_SOURCE,
        HEADER_ORIGINAL_HEADERS,
    }
)
# Names a dead letter's envelope sets, or the relay adds (x-truncated), or a conflict's does:
# an original header with one of them is left out of a dead letter's visible headers
# (``x-original-headers`` keeps it exactly), so a reader of the dead letter (replay deciding
# what to send, an operator) sees the framework's value, once, never the original's.
ENVELOPE_HEADERS = DEAD_LETTER_HEADERS | {
    HEADER_IDEMPOTENCY_KEY,
    HEADER_TRUNCATED,
    HEADER_HASH,
    HEADER_STORED_HASH,
}


def pack_headers(headers: Sequence[tuple[str, bytes]]) -> str:
    """Record headers, names and bytes exactly, as text a header (and jsonb) can hold."""
    # surrogateescape: a name decoded with it (bytes that were not UTF-8) gets its bytes back.
    pairs = [(n.encode("utf-8", "surrogateescape"), bytes(v)) for n, v in headers]
    return base64.b64encode(msgpack.packb(pairs, use_bin_type=True)).decode("ascii")


def unpack_headers(text: str) -> list[tuple[str, bytes]]:
    """The headers :func:`pack_headers` packed; raises ValueError if ``text`` is not such."""
    try:
        pairs = msgpack.unpackb(base64.b64decode(text, validate=True), raw=True)
        return [(n.decode("utf-8", "surrogateescape"), bytes(v)) for n, v in pairs]
    except Exception as exc:
        raise ValueError(f"not packed headers: {type(exc).__name__}: {exc}") from None


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

    The visible headers are the original ones as text, minus those named like the envelope's
    (:data:`ENVELOPE_HEADERS`: its own ``idempotency-key``, so a dead letter is deduplicated
    downstream too, ``x-reason``, ``x-truncated`` ...); the original
    headers, exactly (names, bytes, order, the replaced key header), are in
    ``x-original-headers``, which ``consumer replay`` restores.
    """
    replaced = set(ENVELOPE_HEADERS)
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
        (HEADER_ORIGINAL_HEADERS, pack_headers(msg.headers)),
    ]
    original_ct = msg.header_str(HEADER_CONTENT_TYPE)
    if original_ct is None:
        headers.append((HEADER_CONTENT_TYPE, CONTENT_MSGPACK))
    home = msg.retry_of or msg.topic  # a record of <topic>.retry dead-letters to <topic>.dlq
    return OutboxRow(
        home + DLQ_SUFFIX, msg.key, msg.value or b"", tuple(headers), f"dlq:{msg.source}"
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
        (msg.retry_of or msg.topic) + CONFLICT_SUFFIX,
        msg.key,
        msg.value or b"",
        tuple(headers),
        f"conflict:{msg.source}",
    )


def truncated(
    headers: Sequence[tuple[str, bytes]], value_len: int
) -> list[tuple[str, bytes]] | None:
    """The headers of a dead letter or conflict sent without its value, or None if
    ``headers`` are not such an envelope's.

    A dead letter is a copy of a record that fitted in Kafka, plus the envelope's headers, so
    it can be larger than the relay producer's request limit; refused for its size, it would
    stay pending forever and hold back every later dead letter of its key. The relay then
    sends it empty, with the original headers kept as text (except any larger than
    :data:`MAX_KEPT_HEADER_BYTES`), the exact copy (``x-original-headers``) dropped, and
    ``x-truncated`` saying what was left out; the
    original is still at ``x-source`` while the topic's retention keeps it.
    """
    by_name = {n.lower(): v for n, v in headers}
    ik = by_name.get(HEADER_IDEMPOTENCY_KEY, b"")
    if HEADER_REASON not in by_name or not ik.startswith((b"dlq:", b"conflict:")):
        return None
    # The original's own headers can be most of its size (binary ones doubled as hex): any
    # header larger than this is left out too, else the empty copy could still be refused.
    kept, dropped = [], []
    for n, v in headers:
        if n.lower() == HEADER_ORIGINAL_HEADERS:
            continue
        if len(n.encode("utf-8", "surrogateescape")) + len(v) > MAX_KEPT_HEADER_BYTES:
            dropped.append(storable.safe_text(n[:100]))
        else:
            kept.append((n, v))
    left_out = f"value ({value_len} bytes), {HEADER_ORIGINAL_HEADERS}"
    if dropped:
        more = f" and {len(dropped) - 10} more" if len(dropped) > 10 else ""
        left_out += f", headers {', '.join(dropped[:10])}{more}"
    note = (
        f"{left_out} left out: too large for the relay's producer; "
        f"the original is at {HEADER_SOURCE}"
    )
    return [*kept, (HEADER_TRUNCATED, note.encode())]


# In a dead letter sent without its value, a header larger than this is left out as well.
MAX_KEPT_HEADER_BYTES = 4096


# The relay's producer keeps aiokafka's max_request_size (1 MiB); a row larger than this,
# with room for the trace headers the relay adds, is refused by the client on every tick.
MAX_ROW_BYTES = 1024 * 1024 - 512


def row_size(row: OutboxRow) -> int:
    """The size the producer will count for ``row`` (aiokafka's upper bound)."""
    headers = [(n, v.encode()) for n, v in row.headers]
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(row.key, row.value, headers))
