"""Middleware: async functions around every per-message handler call, composed once per run.

A middleware is ``async def mw(call_next, payload, ctx)``; ``await call_next(payload)`` runs
the rest of the chain (the next middleware, finally the handler) and returns its result.
``app.middleware(mw)`` registers it; the first registered is the outermost. The chain runs
inside the handler's call in runtime/invoke.py: inside the message's savepoint and its
timeout, so whatever a middleware raises is classified exactly like a handler's error
(``Reject``, ``Retry``, transient, unknown), and a database error it swallows is still
found when the savepoint is released. What a middleware must not do: docs/middleware.md.

Composed once when a run binds the app (``App.bound``), as FastStream wraps its consume
middlewares with ``functools.partial`` (faststream/_internal/endpoint/subscriber/call_item.py),
but at start rather than per message; with no middleware there is no chain at all.

This module never touches a store and never decides an outcome.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel
from typing_extensions import TypeVar

from consumer.errors import ConfigError

if TYPE_CHECKING:
    from consumer.context import Context

D = TypeVar("D", default=Any)


class CallNext(Protocol):
    """What a middleware is given: ``await call_next(payload)`` runs the rest of the chain
    (the next middleware, finally the handler) once, and returns the handler's result."""

    def __call__(self, payload: BaseModel, /) -> Awaitable[Any]: ...


class Middleware(Protocol[D]):
    """``async def mw(call_next, payload, ctx) -> result``, registered by ``app.middleware``;
    ``Middleware[Deps]`` when it reads ``ctx.deps``."""

    def __call__(
        self, call_next: CallNext, payload: BaseModel, ctx: Context[D], /
    ) -> Awaitable[Any]: ...


Call = Callable[[Any, Any], Awaitable[Any]]  # (payload, ctx) -> result: a handler's call


class MiddlewareMisuse(RuntimeError):
    """A middleware called ``call_next`` a second time for one message. Refused, so that a
    handler's effects are never applied twice in one savepoint; an error of the middleware's
    code, classified as an unknown error (the handler's ``on_error`` policy)."""


def check(fn: object) -> None:
    """Refuse, at registration, what cannot be a middleware (with how to fix it)."""
    # A function, or an object with an async __call__ (a configured middleware instance).
    call = fn if inspect.isroutine(fn) or not callable(fn) else type(fn).__call__.__get__(fn)
    name = getattr(fn, "__name__", type(fn).__name__)
    if not callable(call) or not inspect.iscoroutinefunction(call):
        raise ConfigError(f"app.middleware({name}): a middleware must be an async function")
    try:
        params = inspect.signature(call).parameters
    except (TypeError, ValueError):
        return
    if len(params) != 3:
        raise ConfigError(
            f"app.middleware({name}): the function must take (call_next, payload, ctx); "
            f"it takes {len(params)} parameters"
        )


class _Next:
    """``call_next`` of one middleware for one message: runs ``inner`` at most once, and only
    while the middleware's own call lasts."""

    __slots__ = ("closed", "ctx", "inner", "running", "used")

    def __init__(self, inner: Call, ctx: Any) -> None:
        self.inner = inner
        self.ctx = ctx
        self.used = False
        self.closed = False
        self.running: asyncio.Task[Any] | None = None

    async def __call__(self, payload: BaseModel) -> Any:
        if self.closed:
            raise MiddlewareMisuse(
                "a middleware's call_next ran after the middleware returned: the handler runs "
                "only inside the message's savepoint, never in a task left behind"
            )
        if self.used:
            raise MiddlewareMisuse(
                "a middleware called call_next twice for one message: the handler runs at "
                "most once per delivery (retries belong to Retry / retry_on)"
            )
        self.used = True
        self.running = asyncio.current_task()
        try:
            return await self.inner(payload, self.ctx)
        finally:
            self.running = None

    async def close(self) -> bool:
        """End this call_next: a later call is refused; a call still running in another task
        (``asyncio.shield``, a task left behind) is cancelled and waited for, so that it never
        uses ``ctx.db`` outside the message's savepoint (concurrently with the batch's next
        statement, which would fail the batch on every redelivery). True if there was one."""
        self.closed = True
        stray = self.running
        if stray is None or stray is asyncio.current_task():
            return False
        stray.cancel()
        await asyncio.wait([stray])
        return True


def _layer(mw: Middleware[Any], inner: Call) -> Call:
    async def layer(payload: Any, ctx: Any) -> Any:
        nxt = _Next(inner, ctx)
        try:
            result = await mw(nxt, payload, ctx)
        finally:
            stray = await nxt.close()
        if stray:
            raise MiddlewareMisuse(
                "a middleware returned while its call_next still ran in another task: the "
                "handler was cancelled, and its result is not the middleware's to record"
            )
        return result

    return layer


def compose(call: Call, middlewares: Sequence[Middleware[Any]]) -> Call | None:
    """The chain around ``call``, first middleware outermost; None without middleware."""
    if not middlewares:
        return None
    for mw in reversed(middlewares):
        call = _layer(mw, call)
    return call
