"""``RateLimit``: at most ``max_per_s`` calls per second per handler, in one worker process.

A token bucket per handler name (``ctx.handler``), refilled at the handler's rate, holding at
most ``burst`` tokens. A call that finds no token reserves one anyway (the bucket goes below
zero) and waits until it is due: callers are served in arrival order, each wait computed
once, no polling. ``max_concurrent`` also bounds the calls of one handler running at once.

The wait happens inside the message's savepoint and its handler timeout: the batch
transaction stays open meanwhile, and a wait longer than the timeout is a timeout (a
transient failure: retried, nothing recorded) that gives its token back. Limits are per
process: ``--workers N`` allows N times the rate. Built on the public API only
(consumer/__init__.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pydantic import BaseModel

from consumer import CallNext, ConfigError, Context


class _Bucket:
    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.last = rate, burst, burst, now

    def reserve(self, now: float) -> float:
        """Take one token; the seconds to wait before it is due (0 if one was there)."""
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class RateLimit:
    """``app.middleware(RateLimit(20))``: 20 calls/s for every handler, each its own bucket;
    ``RateLimit({"payments.settle": 5})``: only the handlers named (``Handler.name``).

    ``burst``: tokens a bucket holds (default: one second's worth, at least 1).
    ``max_concurrent``: calls of one handler at once, for the limited handlers.
    ``clock`` and ``sleep`` are for tests.
    """

    def __init__(
        self,
        max_per_s: float | Mapping[str, float],
        *,
        burst: float | None = None,
        max_concurrent: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        rates = dict(max_per_s) if isinstance(max_per_s, Mapping) else None
        for rate in rates.values() if rates is not None else (max_per_s,):
            if not isinstance(rate, int | float) or not rate > 0:
                raise ConfigError(f"RateLimit: max_per_s must be a positive number, not {rate!r}")
        if burst is not None and not burst >= 1:
            raise ConfigError(f"RateLimit: burst must be at least 1, not {burst!r}")
        if max_concurrent is not None and max_concurrent < 1:
            raise ConfigError(f"RateLimit: max_concurrent must be at least 1, not {max_concurrent}")
        self._rates = rates
        self._default = None if rates is not None else float(max_per_s)  # type: ignore[arg-type]
        self._burst = burst
        self._max_concurrent = max_concurrent
        self._clock, self._sleep = clock, sleep
        self._buckets: dict[str, _Bucket] = {}
        self._running: dict[str, asyncio.Semaphore] = {}

    def _rate(self, handler: str) -> float | None:
        return self._rates.get(handler) if self._rates is not None else self._default

    async def __call__(self, call_next: CallNext, payload: BaseModel, ctx: Context) -> Any:
        rate = self._rate(ctx.handler)
        if rate is None:
            return await call_next(payload)
        now = self._clock()
        bucket = self._buckets.get(ctx.handler)
        if bucket is None:
            burst = self._burst if self._burst is not None else max(rate, 1.0)
            bucket = self._buckets[ctx.handler] = _Bucket(rate, burst, now)
        wait_s = bucket.reserve(now)
        sem = None
        if self._max_concurrent is not None:
            sem = self._running.setdefault(ctx.handler, asyncio.Semaphore(self._max_concurrent))
        try:
            if wait_s > 0:
                await self._sleep(wait_s)
            if sem is not None:
                await sem.acquire()
        except BaseException:
            # Cancelled before the call (the handler timeout, a stop): it never ran, so its
            # token goes back. Kept, each timed-out wait would add to the waits of the calls
            # after it and of its own retry, until every wait outlasts the timeout and
            # nothing runs at all (tests/integration/test_middleware.py).
            bucket.tokens += 1
            raise
        if sem is None:
            return await call_next(payload)
        try:
            return await call_next(payload)
        finally:
            sem.release()
