"""Replies to ``reply-to``: the outbox row answering a request, for a first run or a copy.

A reply is built from the record's result form (consumer/storable.py), encoded in the
content type chosen when the record was completed (:func:`reply_type`, stored in
``dedup.inbox.reply_type``), so every copy's reply payload is byte-identical to the first,
whatever that copy's own content type. The headers named by ``reply_copy_headers``
(``correlation-id``, FastStream's ``correlation_id``) are copied from the copy being
answered: its requester waits for its own correlation id (docs/handlers.md, "Replies").
Replies that cannot or must not be sent are logged and left out, never allowed to fail the
batch's shared outbox statement.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from consumer import storable
from consumer.constants import (
    CONTENT_JSON,
    CONTENT_MSGPACK,
    FRAMEWORK_SUFFIXES,
    HEADER_CONTENT_TYPE,
    HEADER_CORRELATION_ID,
    HEADER_CORRELATION_ID_FASTSTREAM,
    HEADER_REPLY_TO,
    HEADER_REPLY_TO_FASTSTREAM,
    KAFKA_INTERNAL_PREFIX,
)
from consumer.message import Message
from consumer.outbox import envelopes
from consumer.outbox.store import OutboxRow
from consumer.runtime.decide import Known
from consumer.types import Ident

log = logging.getLogger("consumer.replies")

Trace = tuple[tuple[str, str], ...]

# Where a request names its reply topic: ours first, then FastStream's.
REPLY_TO_HEADERS = (HEADER_REPLY_TO, HEADER_REPLY_TO_FASTSTREAM)
DEFAULT_COPY_HEADERS = (HEADER_CORRELATION_ID, HEADER_CORRELATION_ID_FASTSTREAM)
# The spellings consumer/codec.py decodes as JSON; every other request (msgpack, or no
# content-type under a msgpack default) is answered in msgpack, the only other type
# codec.encode writes.
_JSON_SPELLINGS = {CONTENT_JSON, "json", "text/json"}


def reply_type(msg: Message, override: str | None, default_content_type: str) -> str:
    """The content type of every reply to ``msg``'s key, chosen when its record is completed:
    the handler's ``reply_content_type`` if it set one, else the request's content type (the
    ``default_content_type`` setting when it has none, as the decoder read it)."""
    if override:
        return override
    ctype = msg.header_str(HEADER_CONTENT_TYPE) or default_content_type
    base = ctype.split(";")[0].strip().lower()
    return CONTENT_JSON if base in _JSON_SPELLINGS else CONTENT_MSGPACK


def reply_topic(msg: Message) -> str | None:
    """The topic ``msg`` asks its reply on (``reply-to``, else ``reply_to``), or None."""
    for name in REPLY_TO_HEADERS:
        if topic := msg.header_str(name):
            return topic
    return None


class Replies:
    """Builds reply rows for an app whose input topics are ``topics``."""

    def __init__(self, topics: list[str], copy_headers: Sequence[str] = DEFAULT_COPY_HEADERS):
        # A reply there would be consumed by this app as a new message: a requester could
        # feed the app its own results (a loop through every reply-to it can set). The
        # framework's own topics (dead letters, conflicts, retries) and Kafka's are refused
        # by name, in refusal() below.
        self.refused = set(topics)
        self.copy_headers = {n.lower() for n in copy_headers}

    def refusal(self, reply_to: str) -> str:
        """Why no reply may go to ``reply_to`` ("" when one may). Whoever sends a request
        chooses it, so it is checked like any input (tests/integration/test_reply_refused.py)."""
        if not storable.valid_topic(reply_to):
            # The requester's mistake. Written as a row, it would fail the batch's outbox
            # insert on every redelivery.
            return "is not a valid topic"
        if reply_to in self.refused:
            return "is a topic this app consumes"
        if reply_to.endswith(FRAMEWORK_SUFFIXES):
            # Written by the framework only, this app's or another's: a reply in a .retry
            # topic would be run as a retry of its source, one in a .dlq replayed.
            return f"is named like a framework topic ({'/'.join(FRAMEWORK_SUFFIXES)})"
        if reply_to.startswith(KAFKA_INTERNAL_PREFIX):
            # Refused by the broker on every send (InvalidTopicError), which the relay takes
            # for transient: it would send the row again on every tick, forever.
            return "is a Kafka internal topic"
        return ""

    def copied(self, msg: Message) -> list[tuple[str, str]]:
        """The request's headers to copy onto its reply, with the request's own names."""
        out = []
        for name, raw in msg.headers:
            if name.lower() not in self.copy_headers:
                continue
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                text = "\x00"
            if storable.text_ok(text) and storable.text_ok(name):
                out.append((name, text))
            else:
                # Outbox headers are text (jsonb); a binary id cannot come back as it was
                # sent, and a changed one would match nothing.
                log.warning("%s: header %r is not text; not copied to the reply", msg.source, name)
        return out

    def row(
        self, msg: Message, ident: Ident, k: Known, trace: Trace | None = None
    ) -> list[OutboxRow]:
        """The reply to ``msg`` from record ``k`` (none when no reply is wanted or possible)."""
        reply_to = reply_topic(msg)
        if not reply_to or not k.has_result:
            return []
        if why := self.refusal(reply_to):
            log.warning("%s: reply-to %r %s; no reply", msg.source, reply_to, why)
            return []
        body: Any = k.result if k.status == "done" else {"rejected": k.reason}
        # A record completed before reply types were stored was answered in msgpack.
        ctype = k.reply_type or CONTENT_MSGPACK
        try:
            row = envelopes.reply(
                msg,
                reply_to,
                ident[0],
                ident[1],
                k.status,
                body,
                trace,
                content_type=ctype,
                copied=self.copied(msg),
            )
            if (size := envelopes.row_size(row)) > envelopes.MAX_ROW_BYTES:
                # The relay's producer would refuse it on every tick and hold back its key:
                # pending forever, with every later reply of the key behind it.
                log.warning(
                    "%s: the reply to %s is %d bytes, more than the relay can send (%d); no reply",
                    msg.source,
                    reply_to,
                    size,
                    envelopes.MAX_ROW_BYTES,
                )
                return []
            return [row]
        except Exception as exc:
            # Only a record stored before results were checked (runtime/invoke.py) can get
            # here. Failing would fail the batch on every redelivery: no reply, and an error.
            log.error(
                "%s: the stored result of %s cannot be encoded as a reply (%s); no reply",
                msg.source,
                ident,
                storable.describe(exc),
            )
            return []
