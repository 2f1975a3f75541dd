"""Replies to ``reply-to``: the outbox row answering a request, for a first run or a copy.

A reply is built from the record's result form (consumer/storable.py), so every copy's reply
is byte-identical to the first. Replies that cannot or must not be sent are logged and left
out, never allowed to fail the batch's shared outbox statement.
"""

from __future__ import annotations

import logging
from typing import Any

from consumer import storable
from consumer.constants import CONFLICT_SUFFIX, DLQ_SUFFIX, HEADER_REPLY_TO
from consumer.message import Message
from consumer.outbox import envelopes
from consumer.outbox.store import OutboxRow
from consumer.runtime.decide import Known
from consumer.types import Ident

log = logging.getLogger("consumer.replies")

Trace = tuple[tuple[str, str], ...]


class Replies:
    """Builds reply rows for an app whose input topics are ``topics``."""

    def __init__(self, topics: list[str]) -> None:
        # A reply there would be consumed by this app as a new message: a requester could
        # feed the app its own results (a loop through every reply-to it can set) or forge
        # dead letters that `consumer replay` re-drives.
        self.refused = {t + sfx for t in topics for sfx in ("", DLQ_SUFFIX, CONFLICT_SUFFIX)}

    def row(
        self, msg: Message, ident: Ident, k: Known, trace: Trace | None = None
    ) -> list[OutboxRow]:
        """The reply to ``msg`` from record ``k`` (none when no reply is wanted or possible)."""
        reply_to = msg.header_str(HEADER_REPLY_TO)
        if not reply_to or not k.has_result:
            return []
        if not storable.valid_topic(reply_to):
            # The requester's mistake: no reply can go there. Written as a row, it would fail
            # the batch's outbox insert on every redelivery.
            log.warning("%s: reply-to %r is not a valid topic; no reply", msg.source, reply_to)
            return []
        if reply_to in self.refused:
            log.warning(
                "%s: reply-to %r is a topic this app consumes; no reply", msg.source, reply_to
            )
            return []
        body: Any = k.result if k.status == "done" else {"rejected": k.reason}
        try:
            return [envelopes.reply(msg, reply_to, ident[0], ident[1], k.status, body, trace)]
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
