"""What a handler sees: the transaction's connection, its identity, and ``publish``.

``publish`` never produces to Kafka directly: it adds an outbox row that commits (or rolls
back) with the handler's other effects. ``deps`` is the app's dependency container
(docs/lifespan.md): ``Context[Deps]`` types it; a bare ``Context`` is ``Context[Any]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol

from pydantic import BaseModel
from typing_extensions import TypeVar

from consumer import keys
from consumer.constants import CONTENT_MSGPACK, HEADER_CONTENT_TYPE, KAFKA_INTERNAL_TOPICS
from consumer.message import Message

# The container's type. Defaults to Any (PEP 696), so that ``ctx: Context`` keeps meaning what it
# always did under mypy --strict, and ``Context[Deps]`` is accepted by an ``App[Deps]``.
D = TypeVar("D", default=Any)


class Database(Protocol):
    """The subset of an asyncpg connection a handler may use, inside its savepoint."""

    async def execute(self, query: str, *args: Any) -> str: ...
    async def fetch(self, query: str, *args: Any) -> list[Any]: ...
    async def fetchrow(self, query: str, *args: Any) -> Any: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    async def defer(self, query: str, *args: Any) -> None:
        """``execute`` without its status: possibly sent later, in the same transaction and
        order (docs/handlers.md, "Deferred statements")."""
        ...


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message a handler published; becomes one outbox row."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, str], ...]


def to_jsonable(value: Any) -> Any:
    """A handler's result or a published payload as JSON-compatible data."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


@dataclass
class Context(Generic[D]):
    """Per-message context passed to handlers (and to middleware, docs/middleware.md)."""

    db: Database
    namespace: str
    idempotency_key: str
    message: Message
    payload_hash: str
    attempt: int = 1
    outgoing: list[Outgoing] = field(default_factory=list)
    # Set by Handler.invoke, not by whoever builds the Context: the app's container (None
    # when it declares none) and the handler's name (its namespace without the tenant).
    deps: D = None  # type: ignore[assignment]
    handler: str = ""

    @property
    def outside_key(self) -> str:
        """The idempotency key to give an outside system (a payment gateway, a mailer).

        Unique across handlers and tenants, and unambiguous: ``<namespace>:<key>`` with each
        part percent-escaped (consumer/keys.py), so tenant ``org`` with key ``7:inv-3`` and
        tenant ``org:7`` with key ``inv-3`` get different keys. The same on every run.
        """
        return keys.outside_key(self.namespace, self.idempotency_key)

    def publish(
        self,
        topic: str,
        payload: BaseModel | Mapping[str, Any],
        *,
        key: str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        content_type: str = CONTENT_MSGPACK,
    ) -> None:
        """Publish ``payload`` to ``topic`` through the outbox (committed with this message).

        ``content_type`` picks the codec among the app's (msgpack, JSON, and those
        ``app.codec`` registered); a schema codec (Avro, Protobuf) needs ``payload`` to be a
        model. An unknown content type raises ValueError, the handler's error."""
        self.outgoing.append(
            outgoing(topic, payload, key=key, headers=headers, content_type=content_type)
        )


def outgoing(
    topic: str,
    payload: BaseModel | Mapping[str, Any],
    *,
    key: str | bytes | None = None,
    headers: Mapping[str, str] | None = None,
    content_type: str = CONTENT_MSGPACK,
) -> Outgoing:
    """One message to publish, checked and encoded: what ``ctx.publish`` and
    :class:`consumer.Outbox` both build, so a handler's event and a web endpoint's carry the
    same bytes for the same payload. Raises ValueError for a bad topic or content type."""
    from consumer.codecs.registry import encode_for
    from consumer.storable import valid_topic

    if not valid_topic(topic):
        raise ValueError(f"not a valid Kafka topic name: {topic!r}")
    if topic in KAFKA_INTERNAL_TOPICS:  # the relay would resend it on every tick
        raise ValueError(f"{topic!r} is a Kafka internal topic: the broker refuses appends")
    value = encode_for(content_type, payload)  # the active registry's codec (consumer/codecs/)
    raw_key = key.encode() if isinstance(key, str) else key
    hdrs = dict(headers or {})
    hdrs[HEADER_CONTENT_TYPE] = content_type
    return Outgoing(topic, raw_key, value, tuple(hdrs.items()))
