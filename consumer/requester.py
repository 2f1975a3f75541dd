"""A request/reply client for this framework's handlers: send, then await the matching reply.

:class:`Requester` owns a consumer on one reply topic (every partition assigned, no group,
positioned at the end before the first request goes out, so no reply can slip past) and sends
each request with a fresh ``correlation-id`` and ``reply-to``; the worker copies the
correlation id back (settings.reply_copy_headers) and the reply is matched by it. Replies
nobody waits for (a request that timed out, another requester's) are skipped.

The handler side needs nothing: any handler answers a request that carries ``reply-to``
(docs/handlers.md, "Replies"). The same headers in FastStream's spelling (``reply_to``,
``correlation_id``: faststream/kafka/response.py) are honoured too, so a FastStream client
can ask and match by itself.

Never used by the worker: this module is for the requesting side.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import BaseModel

from consumer import codec
from consumer.codecs.registry import plain
from consumer.constants import (
    CONTENT_MSGPACK,
    FRAMEWORK_SUFFIXES,
    HEADER_CONTENT_TYPE,
    HEADER_CORRELATION_ID,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_OUTCOME,
    HEADER_REPLY_TO,
    KAFKA_INTERNAL_PREFIX,
)
from consumer.errors import ConfigError, RequestTimeout


@dataclass(frozen=True, slots=True)
class Reply:
    """A handler's answer: ``value`` decoded by the reply's own content type.

    ``outcome`` is ``done`` (``value`` is the handler's result) or ``rejected`` (``value`` is
    ``{"rejected": reason}``); ``raw`` is the payload exactly as sent, the same bytes for
    every copy of the request."""

    value: Any
    raw: bytes
    content_type: str
    outcome: str
    correlation_id: str
    headers: Mapping[str, str]

    @property
    def rejected(self) -> bool:
        return self.outcome == "rejected"


class Requester:
    """Sends requests and awaits their replies on the topic ``reply_to`` (which must exist).

    ``kafka``: a started ``AIOKafkaProducer`` (used, not stopped) or bootstrap servers (a
    producer is made with ``client_options``, e.g. ``consumer.kafka_config.client_options``).
    Use as ``async with Requester(...) as r: reply = await r.request(...)``.
    """

    def __init__(
        self,
        kafka: AIOKafkaProducer | str,
        reply_to: str,
        *,
        content_type: str = CONTENT_MSGPACK,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        if reply_to.startswith(KAFKA_INTERNAL_PREFIX):
            raise ConfigError(
                f"reply topic {reply_to!r} is a Kafka internal topic: use another name"
            )
        if reply_to.endswith(FRAMEWORK_SUFFIXES):
            # Workers never reply there (consumer/runtime/replies.py): it would only time out.
            raise ConfigError(
                f"reply topic {reply_to!r} is named like a framework topic "
                f"({'/'.join(FRAMEWORK_SUFFIXES)}), which gets no replies: use another name"
            )
        self.reply_to = reply_to
        self.content_type = content_type
        self._options = dict(client_options or {})
        self._own_producer = isinstance(kafka, str)
        self._bootstrap = kafka if isinstance(kafka, str) else None
        self._producer = kafka if isinstance(kafka, AIOKafkaProducer) else None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._failed: BaseException | None = None

    async def __aenter__(self) -> Requester:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect, and position the reply consumer at the end of every partition."""
        self._failed = None
        if self._producer is None:
            self._producer = AIOKafkaProducer(bootstrap_servers=self._bootstrap, **self._options)
            await self._producer.start()
        # A producer passed in knows its servers only in aiokafka's client (no public name).
        servers = self._bootstrap or self._producer.client._bootstrap_servers
        consumer = AIOKafkaConsumer(
            bootstrap_servers=servers, enable_auto_commit=False, **self._options
        )
        await consumer.start()
        self._consumer = consumer
        try:
            if self.reply_to not in await consumer.topics():  # fresh metadata, every topic
                raise ConfigError(
                    f"reply topic {self.reply_to!r} does not exist: create it first "
                    "(one partition is enough for one requester)"
                )
            # The producer's metadata wait (the consumer's cache is not refreshed by topics()).
            parts = await self._producer.partitions_for(self.reply_to)
            tps = [TopicPartition(self.reply_to, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:
                # Resolved now, before any request is sent: a reply is never behind it.
                await consumer.position(tp)
        except BaseException:
            await self.stop()
            raise
        self._reader = asyncio.create_task(self._read(), name=f"requester:{self.reply_to}")

    async def stop(self) -> None:
        """Stop reading and disconnect; requests still waiting fail."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._own_producer and self._producer is not None:
            await self._producer.stop()
            self._producer = None
        self._fail(ConfigError("the requester was stopped"))

    async def request(
        self,
        topic: str,
        payload: BaseModel | Any,
        *,
        timeout_s: float = 30.0,
        key: bytes | str | None = None,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> Reply:
        """Send ``payload`` to ``topic`` and return its reply; :class:`RequestTimeout` if none
        comes within ``timeout_s``. A pydantic model is sent as its JSON-mode dump, by alias."""
        if self._producer is None or self._reader is None:
            raise ConfigError("the requester is not started: use `async with Requester(...)`")
        if self._failed is not None:
            raise self._failed
        ctype = content_type or self.content_type
        body = plain(payload)  # a model by alias, the names its schema validates by
        cid = uuid.uuid4().hex
        sent = {
            **(headers or {}),
            HEADER_CONTENT_TYPE: ctype,
            HEADER_CORRELATION_ID: cid,
            HEADER_REPLY_TO: self.reply_to,
        }
        if idempotency_key is not None:
            sent[HEADER_IDEMPOTENCY_KEY] = idempotency_key
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[cid] = fut  # before sending: the reply may come back at once
        try:
            await self._producer.send_and_wait(
                topic,
                codec.encode(body, ctype),
                key=key.encode() if isinstance(key, str) else key,
                headers=[(n, v.encode()) for n, v in sent.items()],
            )
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise RequestTimeout(
                f"no reply to the request {cid} to {topic!r} on {self.reply_to!r} within "
                f"{timeout_s} s (it may still be applied; sending it again with the same "
                "idempotency key is safe)"
            ) from None
        finally:
            self._waiting.pop(cid, None)

    async def _read(self) -> None:
        assert self._consumer is not None
        try:
            while True:
                batches = await self._consumer.getmany(timeout_ms=1_000)
                for records in batches.values():
                    for record in records:
                        self._deliver(record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the consumer broke: nobody waiting would ever be answered
            self._fail(exc)

    def _deliver(self, record: Any) -> None:
        hdrs: dict[str, str] = {}
        for n, v in record.headers:
            # Anyone can write to the reply topic: a header may have no value (None) or be
            # binary. Neither is a reply's; one such record must not break the reader.
            if v is None:
                continue
            with contextlib.suppress(UnicodeDecodeError):
                hdrs[n] = v.decode()
        cid = hdrs.get(HEADER_CORRELATION_ID)
        fut = self._waiting.get(cid) if cid else None
        if fut is None or fut.done():
            return  # not ours, or its requester gave up
        ctype = hdrs.get(HEADER_CONTENT_TYPE, CONTENT_MSGPACK)
        try:
            value = codec.decode(record.value, ctype)
        except Exception as exc:
            # Not the DecodeError itself: that class means "the consumed record is bad" and is
            # definite, so a handler asking through a Requester would have its own key burned
            # (recorded rejected) for a reply it cannot read. A ValueError is the asker's
            # error, classified by its handler's on_error (docs/handlers.md#classification).
            error = ValueError(f"the reply to request {cid} cannot be decoded: {exc}")
            error.__cause__ = exc
            fut.set_exception(error)
            return
        outcome = hdrs.get(HEADER_OUTCOME, "done")
        fut.set_result(Reply(value, record.value or b"", ctype, outcome, cid or "", hdrs))

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(exc)


async def request(
    kafka: AIOKafkaProducer | str,
    topic: str,
    payload: BaseModel | Any,
    *,
    reply_to: str,
    timeout_s: float = 30.0,
    **options: Any,
) -> Reply:
    """One request and its reply, with a :class:`Requester` made for it (``options``: those
    of :meth:`Requester.request`). For many requests keep one Requester open instead."""
    async with Requester(kafka, reply_to) as r:
        return await r.request(topic, payload, timeout_s=timeout_s, **options)
