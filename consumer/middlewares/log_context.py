"""``LogContext``: the message's coordinates on every line logged while its handler runs.

Binds ``handler``, ``key``, ``topic``, ``partition``, ``offset`` and ``attempt`` (and what
``extra`` returns) with ``structlog.contextvars`` for the duration of the call, so that a
handler's own lines, through ``logging`` or ``structlog``, carry them: consumer/logs.py merges
bound context vars into every line. Unbound afterwards (the previous values restored), also
when the handler raises. A sync handler's thread sees them too (``asyncio.to_thread`` copies
the context). Built on the public API only (consumer/__init__.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from pydantic import BaseModel

from consumer import CallNext, Context


def _hashed(key: str) -> str:
    # The form of consumer/logs.py's key_for_logs, so that these lines and the outcome lines
    # name a key the same way (tests/unit/test_middlewares.py checks they agree).
    return "b2:" + hashlib.blake2b(key.encode(errors="surrogatepass"), digest_size=16).hexdigest()


class LogContext:
    """``app.middleware(LogContext())``; ``hash_keys=True`` writes keys as their digest, as
    ``CONSUMER_HASH_KEYS_IN_LOGS`` does for the framework's lines. ``extra(payload, ctx)``
    returns more fields to bind (a tenant, an account id)."""

    def __init__(
        self,
        *,
        hash_keys: bool = False,
        extra: Callable[[BaseModel, Context], Mapping[str, Any]] | None = None,
    ) -> None:
        self.hash_keys = hash_keys
        self.extra = extra

    async def __call__(self, call_next: CallNext, payload: BaseModel, ctx: Context) -> Any:
        m = ctx.message
        key = ctx.idempotency_key
        fields: dict[str, Any] = {
            "handler": ctx.handler,
            "key": _hashed(key) if self.hash_keys and key else key,
            "topic": m.topic,
            "partition": m.partition,
            "offset": m.offset,
            "attempt": ctx.attempt,
        }
        if self.extra is not None:
            fields.update(self.extra(payload, ctx))
        with structlog.contextvars.bound_contextvars(**fields):
            return await call_next(payload)
