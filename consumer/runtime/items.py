"""A record of a batch as the protocol sees it: its handler, and its identity or its error.

:func:`parse` decodes (by the app's codecs), validates and derives ``(namespace, key, hash)``
once per record; what cannot be identified carries the error its dead letter will name. Never
raises for a record. It also makes the app's codecs the active registry of the task that
processes the batch, which ``ctx.publish`` and replies encode with (consumer/codecs/).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

from consumer.codecs.registry import Codecs, activate
from consumer.dedup.identity import Identity, identify
from consumer.errors import DecodeError, InvalidMessage
from consumer.handler import Handler
from consumer.message import Message

log = logging.getLogger("consumer.items")


class Handlers(Protocol):
    """The part of an app the protocol needs: its group and which handler takes a topic."""

    group: str
    codecs: Codecs

    @property
    def topics(self) -> list[str]: ...

    def handler_for(self, topic: str) -> Handler[Any, Any] | None: ...


@dataclass(slots=True)
class Item:
    msg: Message
    handler: Handler[Any, Any] | None
    ident: Identity | None = None
    error: InvalidMessage | None = None


def parse(msg: Message, handlers: Handlers, tenant_header: str, default_content_type: str) -> Item:
    """The item of ``msg``: identified, or carrying why it cannot be."""
    codecs = handlers.codecs
    activate(codecs)  # a no-op after the first record of the task
    handler = handlers.handler_for(msg.topic)
    if msg.undecodable:  # the Kafka client could not parse it: its raw bytes, dead
        return Item(msg, handler, error=DecodeError(msg.undecodable))
    if handler is None:
        return Item(msg, None, error=InvalidMessage(f"no handler for topic {msg.topic}"))
    try:
        ident = identify(handler, msg, tenant_header, default_content_type, codecs)
        return Item(msg, handler, ident=ident)
    except InvalidMessage as exc:
        return Item(msg, handler, error=exc)
    except Exception as exc:
        # A schema validator or key function that raises something pydantic does not wrap
        # must not take the worker down with every redelivery: a dead letter, as invalid.
        log.warning("identifying %s failed: %s: %s", msg.source, type(exc).__name__, exc)
        return Item(msg, handler, error=InvalidMessage(f"{type(exc).__name__}: {exc}"))
