"""One run of an app's lifespan: its container built, startup hooks, shutdown hooks.

A run is a worker process (consumer/runtime/worker.py; once per ``Worker.run``, so also for a
worker started in-process by tests) or a ``TestApp``. :meth:`Lifespan.start` builds the
dependency container (``App(deps=...)``), runs the ``on_startup`` hooks in registration order
and returns the app bound to that container and its middleware chain (``App.bound``). The
first hook that raises ends the start: :class:`~consumer.errors.StartupFailed`, one line, and
the worker consumes nothing; no shutdown hook runs then (as FastStream's ``_startup``: the
process exits and the operating system closes what the earlier hooks opened).

:meth:`Lifespan.stop` runs the ``on_shutdown`` hooks after the drain, in reverse registration
order: a later hook may use what an earlier one opened (a cache client built on the HTTP
client), so it is closed first, as ``contextlib.AsyncExitStack`` unwinds and as dramatiq
emits its ``after_*`` signals (dramatiq/broker.py, ``emit_after``: reversed middleware).
Every hook runs even when one raises; each failure is one line, and the run reports them.

This module never touches a store; it runs only the application's own code.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, cast

from typing_extensions import TypeVar

from consumer import storable
from consumer.app import App
from consumer.errors import ShutdownFailed, StartupFailed

log = logging.getLogger("consumer.lifespan")

D = TypeVar("D", default=Any)


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


async def _call_hook(hook: Callable[..., Awaitable[None]], deps: object) -> None:
    # App.on_startup/on_shutdown checked it takes (deps) or nothing.
    if inspect.signature(hook).parameters:
        await hook(deps)
    else:
        await hook()


class Lifespan(Generic[D]):
    """The lifespan of one run of ``app``.

    ``deps``: a container to use instead of building one (``TestApp(app, deps=...)``).
    ``hooks``: whether the startup and shutdown hooks run (a test that gives its own
    container usually does not want them to build the real one).
    """

    def __init__(self, app: App[D], *, deps: D | None = None, hooks: bool = True) -> None:
        self.app = app
        self.given = deps
        self.hooks = hooks
        self.deps: D | None = None
        self.started = False

    async def start(self) -> App[D]:
        """Build the container, run the startup hooks; the app bound for this run."""
        app = self.app
        try:
            if self.given is not None:
                deps = self.given
            elif app.deps_factory is not None:
                deps = app.deps_factory()
            else:
                deps = None
        except Exception as exc:
            raise StartupFailed(
                f"App(deps={_name(app.deps_factory)}) raised {storable.reason_text(exc)}"
            ) from exc
        self.deps = deps
        for hook in app.startup_hooks if self.hooks else ():
            try:
                await _call_hook(cast(Callable[..., Awaitable[None]], hook), deps)
            except Exception as exc:
                log.debug("on_startup hook %s failed", _name(hook), exc_info=True)
                raise StartupFailed(
                    f"on_startup hook {_name(hook)} raised {storable.reason_text(exc)}"
                ) from exc
        self.started = True
        return app.bound(deps)

    async def stop(self) -> None:
        """Run the shutdown hooks (reverse order), all of them; raise
        :class:`~consumer.errors.ShutdownFailed` naming those that raised. Nothing to do
        if the start did not finish."""
        if not self.started:
            return
        self.started = False
        failed: list[str] = []
        for hook in reversed(self.app.shutdown_hooks) if self.hooks else ():
            try:
                await _call_hook(cast(Callable[..., Awaitable[None]], hook), self.deps)
            except Exception as exc:
                line = f"on_shutdown hook {_name(hook)} raised {storable.reason_text(exc)}"
                log.error("%s", line)
                log.debug("on_shutdown hook %s failed", _name(hook), exc_info=True)
                failed.append(line)
        if failed:
            raise ShutdownFailed("; ".join(failed))
