"""``App``: the consumer group, its handlers and its settings. The user-facing entry point."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, overload

from pydantic import BaseModel

from consumer.batch_handler import BatchFn, BatchHandler, as_batch_handler
from consumer.context import Context
from consumer.errors import ConfigError
from consumer.handler import Handler, OnError, make_handler
from consumer.settings import Settings, load_settings

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")
H = TypeVar("H", bound=Handler[Any, Any])


class Register(Protocol[M]):
    """What ``@app.handler(...)`` returns: takes an async or a plain (sync) function of
    ``(payload, ctx)``; the Handler's result type is the coroutine's result, not the coroutine."""

    @overload
    def __call__(self, fn: Callable[[M, Context], Awaitable[R]], /) -> Handler[M, R]: ...

    @overload
    def __call__(self, fn: Callable[[M, Context], R], /) -> Handler[M, R]: ...


class App:
    """A consumer group and its handlers.

    ``App("payments")`` names the Kafka consumer group; settings come from ``CONSUMER_*``
    environment variables unless given. ``migrations=`` names folders of the application's own
    versioned ``.sql`` files, applied after the framework's own: best as a mapping from a
    scope the app owns to its folder (``{"payments": "handlers/migrations"}``), which stays
    put when the group is renamed; a plain list is scoped by group and position
    (``payments[0]``). Migrations are never tracked by folder name (see consumer/db/migrate.py).
    """

    def __init__(
        self,
        group: str,
        *,
        settings: Settings | None = None,
        migrations: Mapping[str, str | Path] | Sequence[str | Path] = (),
    ) -> None:
        if not group or not group.replace(".", "").replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"App group {group!r}: use letters, digits, '.', '-' or '_'")
        self.group = group
        self._settings = settings
        self.migrations = _migration_sets(group, migrations)
        self.handlers: list[Handler[Any, Any]] = []
        self._by_topic: dict[str, Handler[Any, Any]] = {}

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
        publishes: Sequence[str] = (),
        reply_content_type: str | None = None,
    ) -> Register[M]:
        """Register a function ``(payload: schema, ctx: Context) -> result``, async or plain
        (a plain one runs in a thread, docs/handlers.md "Sync handlers").

        ``key`` says where the idempotency key comes from: a function of the validated payload,
        ``"header"`` (default, header ``key_header``) or ``"record"`` (the Kafka record key).
        ``hash_exclude`` names payload fields that are not part of its identity.
        ``publishes`` declares the topics it publishes to, for ``consumer topics``.
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
    ) -> Callable[[BatchFn[M]], BatchHandler[M]]:
        """Register an async function ``(batch: list[Item[schema]], ctx: BatchContext)``
        called once per batch with its new messages (consumer/batch_handler.py).

        The options are :meth:`handler`'s; ``timeout_s`` bounds the whole call (on a timeout
        the batch runs again one message at a time, each call bounded by it).
        """

        def register(fn: BatchFn[M]) -> BatchHandler[M]:
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
        for topic in h.topics:
            self._by_topic[topic] = h
        self.handlers.append(h)
        return h

    @property
    def topics(self) -> list[str]:
        return list(self._by_topic)

    def handler_for(self, topic: str) -> Handler[Any, Any] | None:
        return self._by_topic.get(topic)


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
