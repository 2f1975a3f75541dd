"""The Kafka headers the framework reads and writes, per kind of message, as AsyncAPI header
schemas (an object schema of string properties: Kafka header values are bytes, and every one
named here is UTF-8 text). Used by :mod:`consumer.asyncapi` only.

The names are consumer/constants.py's; what each means is where it is read or written:
consumer/runtime/items.py (key, content type, tenant), consumer/runtime/replies.py (reply-to,
copied headers), consumer/outbox/envelopes.py (published rows, replies, dead letters,
conflicts), consumer/runtime/retry_topics.py (``x-retry-*``), consumer/replay.py
(``x-replayed-from``), consumer/propagation.py (W3C trace context).
"""

from __future__ import annotations

from typing import Any

from consumer import constants as c
from consumer.handler import Handler
from consumer.runtime.replies import REPLY_TO_HEADERS
from consumer.settings import Settings

Schema = dict[str, Any]
Props = dict[str, Schema]

# Where a dead letter's x-reason comes from: consumer/errors.py (InvalidMessage.reason) and
# consumer/runtime/transaction.py (rejected, failed, unstorable).
DEAD_LETTER_REASONS = (
    "rejected",
    "failed",
    "unstorable",
    "undecodable",
    "invalid_schema",
    "missing_key",
    "bad_key",
    "no_handler",
)
OUTCOMES = ("done", "rejected")  # a reply's x-outcome: the record's status


def _text(description: str, **more: Any) -> Schema:
    return {"type": "string", "description": description, **more}


def schema(props: Props, required: tuple[str, ...] = ()) -> Schema:
    """The header schema of one message: other headers are allowed (they pass through)."""
    out: Schema = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    return out


def _trace() -> Props:
    return {
        c.TRACEPARENT: _text("W3C trace context (https://www.w3.org/TR/trace-context/)."),
        "tracestate": _text("W3C trace context, vendor part."),
    }


def source(
    h: Handler[Any, Any], s: Settings, content_types: list[str]
) -> tuple[Props, tuple[str, ...]]:
    """What a handler reads from a consumed record (props, required names)."""
    props: Props = {}
    required: tuple[str, ...] = ()
    if h.key_from == "header":
        props[h.key_header] = _text(
            "The idempotency key: the handler's effect happens once per key; a copy with the "
            "same payload is a duplicate, one with another payload a conflict.",
            minLength=1,
        )
        required = (h.key_header,)
    props[c.HEADER_CONTENT_TYPE] = _text(
        f"How the value is encoded (case and parameters ignored); absent: "
        f"{s.default_content_type} (CONSUMER_DEFAULT_CONTENT_TYPE).",
        examples=content_types,
    )
    props[s.tenant_header] = _text(
        "A tenant: its keys are a namespace of their own (<handler>@<tenant>); "
        "CONSUMER_TENANT_HEADER names this header."
    )
    first, *others = REPLY_TO_HEADERS
    props[first] = _text("Ask for the handler's result: the topic to send the reply to.")
    for name in others:
        props[name] = _text(f"FastStream's spelling of {first}, read when {first} is absent.")
    for name in s.reply_copy_headers:
        props[name] = _text(
            "Copied onto the reply, so the requester can match it (CONSUMER_REPLY_COPY_HEADERS)."
        )
    props.update(_trace())
    props[c.HEADER_REPLAYED_FROM] = _text(
        "Set by `consumer replay` on a dead letter sent again: where the dead letter was."
    )
    return props, required


def retry(h: Handler[Any, Any], s: Settings, content_types: list[str]) -> Schema:
    """A record on ``<topic>.retry``: the original's headers plus the retry's own."""
    props, required = source(h, s, content_types)
    props.update(
        {
            c.HEADER_RETRY_ATTEMPT: _text(
                "The run this record is for (2: the first retry).", pattern="^[0-9]+$"
            ),
            c.HEADER_RETRY_DUE_MS: _text(
                "When it is due, epoch milliseconds: its partition is paused until then.",
                pattern="^[0-9]+$",
            ),
            c.HEADER_RETRY_ORIGIN: _text("Where the original record was: topic/partition/offset."),
            c.HEADER_RETRY_REASON: _text("Why the last run failed."),
            c.HEADER_ORIGINAL_HEADERS: _text(
                "The original record's headers exactly (msgpack pairs, base64), restored "
                "on arrival."
            ),
        }
    )
    req = (*required, c.HEADER_RETRY_ATTEMPT, c.HEADER_RETRY_DUE_MS, c.HEADER_RETRY_ORIGIN)
    return schema(props, req)


def _envelope(kind: str) -> Props:
    return {
        c.HEADER_IDEMPOTENCY_KEY: _text(
            f"{kind}:<x-source>: the same for every copy the relay sends, so a consumer "
            "built with this framework applies it once."
        ),
        c.HEADER_NAMESPACE: _text("The handler's namespace (<handler> or <handler>@<tenant>)."),
        c.HEADER_KEY: _text("The original's idempotency key (empty when it had none)."),
        c.HEADER_SOURCE: _text("Where the original record was: topic/partition/offset."),
        c.HEADER_DETAIL: _text("What happened, in words (at most 1000 characters)."),
        c.HEADER_CONTENT_TYPE: _text(
            f"The original's content type; {c.CONTENT_MSGPACK} when it had none."
        ),
    }


def dead_letter() -> Schema:
    """A record on ``<topic>.dlq``: the original's headers (as text) plus the envelope's."""
    props = _envelope("dlq")
    props.update(
        {
            c.HEADER_REASON: _text("Why it was dead-lettered.", examples=list(DEAD_LETTER_REASONS)),
            c.HEADER_ORIGINAL_HEADERS: _text(
                "The original headers exactly (msgpack pairs, base64): `consumer replay` "
                "sends the original again with them."
            ),
            c.HEADER_TRUNCATED: _text(
                "Set when the relay sent it without its value (too large): what was left out."
            ),
        }
    )
    props.update(_trace())
    return schema(props, (c.HEADER_IDEMPOTENCY_KEY, c.HEADER_REASON, c.HEADER_SOURCE))


def conflict() -> Schema:
    """A record on ``<topic>.conflicts``: a key reused with another payload, both hashes."""
    props = _envelope("conflict")
    props.update(
        {
            c.HEADER_REASON: _text("Always conflict.", const="conflict"),
            c.HEADER_HASH: _text(f"This payload's hash ({c.HASH_ALG})."),
            c.HEADER_STORED_HASH: _text("The hash recorded for the key's first payload."),
            c.HEADER_TRUNCATED: _text(
                "Set when the relay sent it without its value (too large): what was left out."
            ),
        }
    )
    req = (c.HEADER_IDEMPOTENCY_KEY, c.HEADER_REASON, c.HEADER_HASH, c.HEADER_STORED_HASH)
    return schema(props, req)


def published(default_content_type: str) -> Schema:
    """A row a handler published (``ctx.publish``): its own headers plus the derived ones."""
    props: Props = {
        c.HEADER_IDEMPOTENCY_KEY: _text(
            "Derived from the consumed message (namespace, key, index): the same on every "
            "republish, so a downstream consumer applies it once."
        ),
        c.HEADER_SOURCE: _text("The consumed record it came from: topic/partition/offset."),
        c.HEADER_CONTENT_TYPE: _text(
            "How the value is encoded (ctx.publish's content_type; default "
            f"{default_content_type})."
        ),
    }
    props.update(_trace())
    return schema(props, (c.HEADER_IDEMPOTENCY_KEY, c.HEADER_SOURCE))


def reply(s: Settings) -> Schema:
    """A reply to ``reply-to``: the record's outcome, in the request's content type."""
    props: Props = {
        c.HEADER_CONTENT_TYPE: _text(
            "The request's content type (JSON in, JSON out) unless the handler sets "
            "reply_content_type; the same for every copy answered.",
            enum=[c.CONTENT_JSON, c.CONTENT_MSGPACK],
        ),
        c.HEADER_IDEMPOTENCY_KEY: _text("reply:<namespace>:<key>: the same for every copy."),
        c.HEADER_OUTCOME: _text("The record's status.", enum=list(OUTCOMES)),
        c.HEADER_NAMESPACE: _text("The handler's namespace (<handler> or <handler>@<tenant>)."),
        c.HEADER_KEY: _text("The request's idempotency key."),
        c.HEADER_SOURCE: _text("The request answered: topic/partition/offset."),
    }
    for name in s.reply_copy_headers:
        props[name] = _text("Copied from the request answered (CONSUMER_REPLY_COPY_HEADERS).")
    props.update(_trace())
    return schema(props, (c.HEADER_CONTENT_TYPE, c.HEADER_IDEMPOTENCY_KEY, c.HEADER_OUTCOME))
