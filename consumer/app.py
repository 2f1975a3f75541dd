"""``App``: the consumer group, its handlers, its lifespan hooks, middleware and settings.

The user-facing entry point. Lifespan hooks and the dependency container: docs/lifespan.md
(run by consumer/lifespan.py); middleware: docs/middleware.md (consumer/middleware.py).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, overload

from pydantic import BaseModel
from typing_extensions import TypeVar

from consumer import middleware as mw
from consumer.batch_handler import BatchFn, BatchHandler, as_batch_handler
from consumer.codecs.registry import Codec, Codecs
from consumer.constants import RETRY_SUFFIX
from consumer.context import Context
from consumer.errors import ConfigError
from consumer.handler import Handler, OnError, RetryMode, make_handler
from consumer.settings import Settings, load_settings

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")
H = TypeVar("H", bound=Handler[Any, Any])
D = TypeVar("D", default=Any)  # the app's dependency container (docs/lifespan.md)

# A lifespan hook: takes the container, or nothing.
Hook = Callable[[D], Awaitable[None]] | Callable[[], Awaitable[None]]
F = TypeVar("F", bound=Callable[..., Awaitable[None]])
W = TypeVar("W", bound=Callable[..., Awaitable[Any]])


class Register(Protocol[M, D]):
    """What ``@app.handler(...)`` returns: takes an async or a plain (sync) function of
    ``(payload, ctx)``; the Handler's result type is the coroutine's result, not the coroutine."""

    @overload
    def __call__(self, fn: Callable[[M, Context[D]], Awaitable[R]], /) -> Handler[M, R]: ...

    @overload
    def __call__(self, fn: Callable[[M, Context[D]], R], /) -> Handler[M, R]: ...


class App(Generic[D]):
    """A consumer group and its handlers.

    ``App("payments")`` names the Kafka consumer group; settings come from ``CONSUMER_*``
    environment variables unless given. ``migrations=`` names folders of the application's own
    versioned ``.sql`` files, applied after the framework's own: best as a mapping from a
    scope the app owns to its folder (``{"payments": "handlers/migrations"}``), which stays
    put when the group is renamed; a plain list is scoped by group and position
    (``payments[0]``). Migrations are never tracked by folder name (see consumer/db/migrate.py).

    ``deps=`` names the app's dependency container: a class (or any function) called with no
    arguments once per worker process, before the startup hooks, which fill it; handlers
    read it as ``ctx.deps`` (typed by ``Context[Deps]``). See docs/lifespan.md.
    """

    def __init__(
        self,
        group: str,
        *,
        settings: Settings | None = None,
        migrations: Mapping[str, str | Path] | Sequence[str | Path] = (),
        deps: Callable[[], D] | None = None,
    ) -> None:
        if not group or not group.replace(".", "").replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"App group {group!r}: use letters, digits, '.', '-' or '_'")
        self.group = group
        self._settings = settings
        self.migrations = _migration_sets(group, migrations)
        self.handlers: list[Handler[Any, Any]] = []
        self._by_topic: dict[str, Handler[Any, Any]] = {}
        self._by_retry_topic: dict[str, Handler[Any, Any]] = {}  # <topic>.retry, retry="topics"
        # Content type -> codec: msgpack and JSON, plus what ``codec()`` registers.
        self.codecs = Codecs()
        if deps is not None and not callable(deps):
            raise ConfigError("App(deps=...) takes the container's class, not an instance")
        self.deps_factory = deps
        self.startup_hooks: list[Hook[D]] = []
        self.shutdown_hooks: list[Hook[D]] = []
        self.middlewares: list[mw.Middleware[D]] = []

    # ---------------------------------------------------------------- lifespan, middleware

    def on_startup(self, fn: F) -> F:
        """Register ``async def hook(deps)`` (or ``hook()``), run once per worker process
        before it consumes, in registration order. One that raises stops the worker: one line,
        exit code RET_STARTUP, nothing consumed (docs/lifespan.md)."""
        self.startup_hooks.append(_hook(fn, "on_startup"))
        return fn

    def on_shutdown(self, fn: F) -> F:
        """Register ``async def hook(deps)`` (or ``hook()``), run once per worker process
        after its drain (also on SIGTERM), in reverse registration order (docs/lifespan.md)."""
        self.shutdown_hooks.append(_hook(fn, "on_shutdown"))
        return fn

    def middleware(self, fn: W) -> W:
        """Register ``async def mw(call_next, payload, ctx)`` around every per-message
        handler call; the first registered is the outermost (docs/middleware.md)."""
        mw.check(fn)
        self.middlewares.append(fn)
        return fn

    def bound(self, deps: D | None) -> App[D]:
        """A copy for one run (a worker, a TestApp): its handlers are copies carrying ``deps``
        and the middleware chain, composed here once. The app itself is left as it is, so two
        runs in one process each have their own container."""
        out = copy.copy(self)
        out.handlers, out._by_topic, out._by_retry_topic = [], {}, {}
        for h in self.handlers:
            b = dataclasses.replace(h, deps=deps, chain=None)
            # Per-message handlers only: a batch handler's batch call has no per-message
            # signature, and wrapping only its one-at-a-time fallback runs would make a
            # middleware see some of its messages and not others (docs/middleware.md).
            if not isinstance(b, BatchHandler):
                b.chain = mw.compose(b.call, self.middlewares)
            out.handlers.append(b)
            out._by_topic.update(dict.fromkeys(b.topics, b))
            if b.retry == "topics":
                out._by_retry_topic.update(dict.fromkeys(_retry_topics(b), b))
        return out

    @property
    def given_settings(self) -> Settings | None:
        """The settings passed in or already loaded; None if the environment was not read."""
        return self._settings

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        self._settings = value

    def codec(self, content_type: str, codec: Codec) -> None:
        """Decode records whose ``content-type`` is ``content_type`` with ``codec``, and encode
        with it for ``ctx.publish(content_type=...)`` (docs/codecs.md). Parameters and case
        of the content type do not matter; registering one again replaces its codec."""
        try:
            self.codecs.register(content_type, codec)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"app.codec({content_type!r}, ...): {exc}") from None

    def handler(
        self,
        *topics: str,
        schema: type[M],
        key: Callable[[M], object] | Literal["header", "record"] | None = None,
        key_header: str = "idempotency-key",
        name: str | None = None,
        hash_exclude: set[str] | frozenset[str] | None = None,
        retry_on: tuple[type[BaseException], ...] = (),
        max_attempts: int | None = None,
        on_error: OnError = "retry",
        timeout_s: float | None = None,
        publishes: Sequence[str] | Mapping[str, type[BaseModel]] = (),
        retry: RetryMode = "in-place",
        reply_content_type: str | None = None,
    ) -> Register[M, D]:
        """Register a function ``(payload: schema, ctx: Context) -> result``, async or plain
        (a plain one runs in a thread, docs/handlers.md "Sync handlers").

        ``key`` says where the idempotency key comes from: a function of the validated payload,
        ``"header"`` (default, header ``key_header``) or ``"record"`` (the Kafka record key).
        ``hash_exclude`` names payload fields that are not part of its identity.
        ``publishes`` declares the topics it publishes to, for ``consumer topics``; a
        mapping ``{topic: Model}`` also names their payloads, for ``consumer asyncapi``.
        ``retry="topics"`` sends a transiently failed message to ``<topic>.retry`` and lets
        the partition move on (docs/handlers.md, "Retries that do not block").
        ``reply_content_type`` fixes its replies' encoding (default: the request's).
        """

        def register(fn: Callable[..., Any]) -> Handler[M, Any]:
            h: Handler[M, Any] = make_handler(
                fn,
                group=self.group,
                topics=topics,
                schema=schema,
                key=key,
                key_header=key_header,
                name=name,
                hash_exclude=hash_exclude,
                retry_on=retry_on,
                max_attempts=max_attempts,
                on_error=on_error,
                timeout_s=timeout_s,
                publishes=publishes,
                retry=retry,
                reply_content_type=reply_content_type,
            )
            return self._add(h)

        return register

    def batch_handler(
        self,
        *topics: str,
        schema: type[M],
        key: Callable[[M], object] | Literal["header", "record"] | None = None,
        key_header: str = "idempotency-key",
        name: str | None = None,
        hash_exclude: set[str] | frozenset[str] | None = None,
        retry_on: tuple[type[BaseException], ...] = (),
        max_attempts: int | None = None,
        on_error: OnError = "retry",
        timeout_s: float | None = None,
        reply_content_type: str | None = None,
    ) -> Callable[[BatchFn[M, D]], BatchHandler[M]]:
        """Register an async function ``(batch: list[Item[schema]], ctx: BatchContext)``
        called once per batch with its new messages (consumer/batch_handler.py).

        The options are :meth:`handler`'s; ``timeout_s`` bounds the whole call (on a timeout
        the batch runs again one message at a time, each call bounded by it).
        """

        def register(fn: BatchFn[M, D]) -> BatchHandler[M]:
            h: Handler[M, Any] = make_handler(
                fn,
                group=self.group,
                topics=topics,
                schema=schema,
                key=key,
                key_header=key_header,
                name=name,
                hash_exclude=hash_exclude,
                retry_on=retry_on,
                max_attempts=max_attempts,
                on_error=on_error,
                timeout_s=timeout_s,
                decorator="batch_handler",
                reply_content_type=reply_content_type,
            )
            return self._add(as_batch_handler(h))

        return register

    def _add(self, h: H) -> H:
        for topic in h.topics:
            if topic in self._by_topic:
                raise ConfigError(
                    f"topic {topic!r} already has handler {self._by_topic[topic].name!r}; "
                    "one handler per topic"
                )
        if any(other.name == h.name for other in self.handlers):
            raise ConfigError(f"two handlers named {h.name!r}; pass name= to one of them")
        retry_topics = _retry_topics(h) if h.retry == "topics" else []
        for topic in [*h.topics, *retry_topics]:
            # The retry topic is the framework's: no handler's source, not even its own's.
            sources = (*self._by_topic, *h.topics)
            if topic in self._by_retry_topic or (topic in retry_topics and topic in sources):
                raise ConfigError(
                    f"topic {topic!r} is both a source and the retry topic of a handler with "
                    "retry='topics'; rename the source"
                )
        for topic in h.topics:
            self._by_topic[topic] = h
        for topic in retry_topics:
            self._by_retry_topic[topic] = h
        self.handlers.append(h)
        return h

    @property
    def topics(self) -> list[str]:
        """The source topics (the ones handlers were registered for)."""
        return list(self._by_topic)

    @property
    def subscribed(self) -> list[str]:
        """What a worker subscribes to: the sources, and the ``<topic>.retry`` of handlers
        with ``retry="topics"``."""
        return [*self._by_topic, *self._by_retry_topic]

    def handler_for(self, topic: str) -> Handler[Any, Any] | None:
        """The handler of a source topic, or of a handler's ``<topic>.retry``."""
        return self._by_topic.get(topic) or self._by_retry_topic.get(topic)


def _retry_topics(h: Handler[Any, Any]) -> list[str]:
    return [t + RETRY_SUFFIX for t in h.topics]


def _hook(fn: Callable[..., Awaitable[None]], kind: str) -> Any:
    name = getattr(fn, "__name__", repr(fn))
    if not inspect.iscoroutinefunction(fn):
        raise ConfigError(f"@app.{kind} on {name}: the hook must be an async function")
    if len(inspect.signature(fn).parameters) > 1:
        raise ConfigError(f"@app.{kind} on {name}: the hook takes (deps) or nothing")
    return fn


def _migration_sets(
    group: str, migrations: Mapping[str, str | Path] | Sequence[str | Path]
) -> dict[str, Path]:
    """Scope -> folder. A mapping names its scopes; a list gets ``group[i]``, which no
    explicit scope can spell (no brackets allowed), so the two forms never collide."""
    from consumer.db.migrate import check_scope

    if isinstance(migrations, (str, Path)):
        raise ConfigError("migrations= takes a list of folders or a {scope: folder} mapping")
    if isinstance(migrations, Mapping):
        return {check_scope(str(scope)): Path(folder) for scope, folder in migrations.items()}
    return {f"{group}[{i}]": Path(folder) for i, folder in enumerate(migrations)}
