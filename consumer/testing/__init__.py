"""Test your handlers without Kafka: the real dedup protocol, in memory, with fault injection.

::

    from consumer import Outcome
    from consumer.testing import TestApp

    async def test_settles_once():
        async with TestApp(app, db=DSN) as t:
            first = await t.send("payments.requested", PaymentRequested(...))
            assert first.outcome is Outcome.APPLIED
            t.crash_after_commit()
            ...

:class:`TestApp` runs the runtime's own batch processor against an in-memory Kafka and Redis,
and a PostgreSQL connection (rolled back at the end) or an in-memory store. See
docs/testing.md. Nothing here is imported by the runtime.
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

from pydantic import BaseModel

from consumer import codec
from consumer.codecs.registry import Codecs
from consumer.constants import CONTENT_MSGPACK, HEADER_CONTENT_TYPE
from consumer.message import Message
from consumer.testing.database import DatabaseRequired
from consumer.testing.harness import TestApp
from consumer.testing.kafka import MemoryKafka
from consumer.testing.result import HarnessError, SendResult
from consumer.testing.store import MemoryStore, MemoryTx

M = TypeVar("M", bound=BaseModel)


@overload
def payload(message: Message) -> Any: ...
@overload
def payload(message: Message, schema: type[M], *, codecs: Codecs | None = None) -> M: ...
def payload(
    message: Message, schema: type[M] | None = None, *, codecs: Codecs | None = None
) -> Any:
    """Decode a message's value by its content-type; validate it with ``schema`` if given.
    ``codecs`` (``app.codecs``) decodes content types the app registered, by ``schema``."""
    if codecs is not None and schema is not None:
        ctype = message.header_str(HEADER_CONTENT_TYPE) or CONTENT_MSGPACK
        return schema.model_validate(codecs.decode(message.value, ctype, schema))
    data = codec.decode(message.value, message.header_str(HEADER_CONTENT_TYPE))
    return data if schema is None else schema.model_validate(data)


__all__ = [
    "DatabaseRequired",
    "HarnessError",
    "MemoryKafka",
    "MemoryStore",
    "MemoryTx",
    "SendResult",
    "TestApp",
    "payload",
]
