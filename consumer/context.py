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
from consumer.constants import CONTENT_JSON, CONTENT_MSGPACK, HEADER_CONTENT_TYPE
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
        """Publish ``payload`` to ``topic`` through the outbox (committed with this message)."""
        from consumer.codec import encode
        from consumer.storable import valid_topic

        if not valid_topic(topic):
            raise ValueError(f"not a valid Kafka topic name: {topic!r}")
        if content_type not in (CONTENT_MSGPACK, CONTENT_JSON):
            raise ValueError(f"content_type must be {CONTENT_MSGPACK!r} or {CONTENT_JSON!r}")
        raw_key = key.encode() if isinstance(key, str) else key
        hdrs = dict(headers or {})
        hdrs[HEADER_CONTENT_TYPE] = content_type
        self.outgoing.append(
            Outgoing(
                topic, raw_key, encode(to_jsonable(payload), content_type), tuple(hdrs.items())
            )
        )
