"""The Redis fast path with its degraded mode: leases and done markers that may fail.

Wraps a :class:`LeaseStore`. Any Redis error switches to "degraded" for ``redis_retry_s``:
every key is treated as leased to us and no marker is read or written, so processing goes on
on PostgreSQL alone (the inbox is the fence) and returns to the fast path when Redis answers
again. This module never decides an outcome; it only says what Redis believes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import Any

from consumer.dedup.leases import DoneMarker, LeaseResult, LeaseStore
from consumer.settings import Settings
from consumer.types import Ident

log = logging.getLogger(__name__)


class Accelerator:
    """Leases and done markers for one worker (``token``), tolerant of Redis failures."""

    def __init__(self, store: LeaseStore, settings: Settings, token: str) -> None:
        self.store = store
        self.settings = settings
        self.token = token
        self.failures = 0
        self._degraded_until = 0.0

    @property
    def degraded(self) -> bool:
        return time.monotonic() < self._degraded_until

    def _degrade(self, exc: BaseException) -> None:
        if not self.degraded:
            log.warning(
                "redis unavailable (%s: %s); continuing on PostgreSQL alone for %.0fs",
                type(exc).__name__,
                exc,
                self.settings.redis_retry_s,
            )
        self.failures += 1
        self._degraded_until = time.monotonic() + self.settings.redis_retry_s

    async def _call(self, call: Awaitable[Any], default: Any) -> Any:
        if self.degraded:
            with contextlib.suppress(BaseException):
                call.close()  # type: ignore[attr-defined]
            return default
        try:
            return await call
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._degrade(exc)
            return default

    async def acquire(self, idents: Sequence[Ident]) -> list[LeaseResult]:
        """One round trip: done marker or lease per key. Degraded: every lease granted."""
        granted = [LeaseResult("acquired") for _ in idents]
        result: list[LeaseResult] = await self._call(
            self.store.acquire(idents, self.token, self.settings.lease_ms), granted
        )
        return result

    async def wait_for_holders(self, held: list[Ident]) -> dict[Ident, LeaseResult]:
        """Poll leased keys until they finish elsewhere (done) or free up (acquired), bounded."""
        out: dict[Ident, LeaseResult] = {}
        deadline = time.monotonic() + self.settings.lease_wait_ms / 1000
        delay = 0.02
        while held and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
            for ident, state in zip(held, await self.acquire(held), strict=True):
                out[ident] = state
            held = [i for i in held if out[i].state == "held"]
        return out

    async def renew(self, idents: Sequence[Ident]) -> int:
        renewed: int = await self._call(
            self.store.renew(idents, self.token, self.settings.lease_ms), 0
        )
        return renewed

    async def finish(self, done: Sequence[DoneMarker], release: Sequence[Ident]) -> None:
        """Done markers, then compare-and-delete of our leases: one round trip, after commit."""
        await self._call(
            self.store.finish(done, release, self.token, self.settings.done_cache_s), None
        )
