"""A registered handler: the user's function plus everything that defines a message's identity.

``@app.handler(...)`` returns a :class:`Handler`, not the bare function; unknown or
inconsistent options are refused at import time with a message that says how to fix them.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from consumer import keys
from consumer.constants import CONTENT_JSON, CONTENT_MSGPACK
from consumer.errors import ConfigError

if TYPE_CHECKING:
    from consumer.context import Context

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")

KeyFrom = Literal["header", "record", "payload"]
OnError = Literal["retry", "reject"]
# "in-place": a transient failure holds the partition and runs again (the default);
# "topics": it goes to <topic>.retry and the partition moves on (runtime/retry_topics.py).
RetryMode = Literal["in-place", "topics"]
REPLY_CONTENT_TYPES = (CONTENT_JSON, CONTENT_MSGPACK)  # what consumer/codec.py can encode
HandlerFn = Callable[[M, "Context"], Awaitable[R]] | Callable[[M, "Context"], R]


@dataclass(eq=False)
class Handler(Generic[M, R]):
    """One handler: topics it consumes, the payload schema and how identity is derived."""

    fn: Callable[..., Any]
    topics: tuple[str, ...]
    schema: type[M]
    name: str
    key_from: KeyFrom = "header"
    key_fn: Callable[[M], object] | None = None
    key_header: str = "idempotency-key"
    hash_exclude: frozenset[str] = field(default_factory=frozenset)
    retry_on: tuple[type[BaseException], ...] = ()
    max_attempts: int | None = None
    on_error: OnError = "retry"
    timeout_s: float | None = None
    is_async: bool = True
    # Topics the handler publishes to (ctx.publish), declared so `consumer topics` can list
    # and create them; undeclared ones still work. ``publishes={topic: Model}`` also names
    # each one's payload model, for `consumer asyncapi` (consumer/asyncapi.py).
    publishes: tuple[str, ...] = ()
    publish_schemas: Mapping[str, type[BaseModel]] = field(default_factory=dict)
    retry: RetryMode = "in-place"
    # Set on the copy a run binds (App.bound, consumer/lifespan.py), never at registration:
    # the app's dependency container and the middleware chain composed around ``call``.
    deps: Any = field(default=None, repr=False)
    chain: Callable[[Any, Any], Awaitable[Any]] | None = field(default=None, repr=False)
    # The content type of its replies; None: the request's (consumer/runtime/replies.py).
    reply_content_type: str | None = None

    def __post_init__(self) -> None:
        unknown = self.hash_exclude - set(self.schema.model_fields)
        if unknown:
            raise ConfigError(
                f"handler {self.name!r}: hash_exclude names fields the schema "
                f"{self.schema.__name__} does not have: {sorted(unknown)}"
            )
        if self.on_error not in ("retry", "reject"):
            raise ConfigError(f"handler {self.name!r}: on_error must be 'retry' or 'reject'")
        if self.retry not in ("in-place", "topics"):
            raise ConfigError(
                f"handler {self.name!r}: retry must be 'in-place' or 'topics', not {self.retry!r}"
            )
        if self.reply_content_type not in (None, *REPLY_CONTENT_TYPES):
            raise ConfigError(
                f"handler {self.name!r}: reply_content_type must be one of "
                f"{', '.join(REPLY_CONTENT_TYPES)} (or None: the request's), "
                f"not {self.reply_content_type!r}"
            )

    async def call(self, payload: M, ctx: Context) -> R:
        """Run the user's function; sync functions run in a thread so the loop keeps beating."""
        if self.is_async:
            result: R = await self.fn(payload, ctx)
            return result
        return await asyncio.to_thread(self.fn, payload, ctx)

    def invoke(self, payload: M, ctx: Context) -> Awaitable[R]:
        """What the runtime calls (runtime/invoke.py): ``ctx.deps`` set, then the middleware
        chain around :meth:`call` when the app has middleware, else :meth:`call` itself.
        A plain function returning the awaitable: without middleware, no extra coroutine."""
        ctx.deps = self.deps
        ctx.handler = self.name
        if self.chain is None:
            return self.call(payload, ctx)
        return self.chain(payload, ctx)

    async def __call__(self, payload: M, ctx: Context) -> R:
        return await self.call(payload, ctx)


def make_handler(
    fn: Callable[..., Any],
    *,
    group: str,
    topics: tuple[str, ...],
    schema: type[M],
    key: Callable[[M], object] | Literal["header", "record"] | None,
    key_header: str,
    name: str | None,
    hash_exclude: set[str] | frozenset[str] | None,
    retry_on: tuple[type[BaseException], ...],
    max_attempts: int | None,
    on_error: OnError,
    timeout_s: float | None,
    publishes: Sequence[str] | Mapping[str, type[BaseModel]] = (),
    decorator: str = "handler",
    retry: RetryMode = "in-place",
    reply_content_type: str | None = None,
) -> Handler[M, Any]:
    """Validate decorator options and build the Handler (``decorator``: for the messages)."""
    if not topics:
        raise ConfigError(f"@{decorator} on {fn.__name__}: give at least one topic")
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        raise ConfigError(
            f"@{decorator} on {fn.__name__}: schema= must be a pydantic BaseModel subclass"
        )
    params = inspect.signature(fn).parameters
    if len(params) != 2:
        raise ConfigError(
            f"@{decorator} on {fn.__name__}: the function must take "
            f"({'batch' if decorator == 'batch_handler' else 'payload'}, ctx); "
            f"it takes {len(params)} parameters"
        )
    key_from: KeyFrom
    key_fn: Callable[[M], object] | None = None
    if key is None or key == "header":
        key_from = "header"
    elif key == "record":
        key_from = "record"
    elif callable(key):
        key_from, key_fn = "payload", key
    else:
        raise ConfigError(
            f"@{decorator} on {fn.__name__}: key= must be a function of the payload, "
            f"'header' or 'record', not {key!r}"
        )
    final_name = name if name is not None else f"{group}.{fn.__name__}"
    if (problem := keys.name_problem(final_name)) is not None:
        # The name is the namespace: composed with tenants (name@tenant), joined into derived
        # keys, and put inside a Redis hash tag (lease:{ns}:key). Checked for the default
        # name too: a function's __name__ can be set to anything.
        raise ConfigError(f"@{decorator} on {fn.__name__}: handler name {final_name!r} {problem}")
    if max_attempts is not None and max_attempts < 1:
        raise ConfigError(f"@{decorator} on {fn.__name__}: max_attempts must be >= 1")
    if isinstance(publishes, str):
        raise ConfigError(
            f"@{decorator} on {fn.__name__}: publishes= takes a list of topics "
            "or a {topic: Model} mapping"
        )
    from consumer.storable import valid_topic

    bad = [t for t in publishes if not valid_topic(t)]
    if bad:
        raise ConfigError(f"@{decorator} on {fn.__name__}: publishes= has invalid topics {bad}")
    models = dict(publishes) if isinstance(publishes, Mapping) else {}
    odd = [t for t, m in models.items() if not (isinstance(m, type) and issubclass(m, BaseModel))]
    if odd:
        raise ConfigError(
            f"@{decorator} on {fn.__name__}: publishes= maps {odd} to something that is not "
            "a pydantic BaseModel subclass"
        )
    return Handler(
        fn=fn,
        topics=topics,
        schema=schema,
        name=final_name,
        key_from=key_from,
        key_fn=key_fn,
        key_header=key_header,
        hash_exclude=frozenset(hash_exclude or ()),
        retry_on=tuple(retry_on),
        max_attempts=max_attempts,
        on_error=on_error,
        timeout_s=timeout_s,
        is_async=inspect.iscoroutinefunction(fn),
        publishes=tuple(publishes),
        publish_schemas=models,
        retry=retry,
        reply_content_type=reply_content_type,
    )
