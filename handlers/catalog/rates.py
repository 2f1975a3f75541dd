"""The catalog sample's "fx rates" service: a small real HTTP service its handlers call.

    uvicorn handlers.catalog.rates:app --port 8100

``GET /rates/{currency}`` answers ``{"currency": "EUR", "usd": "1.0850"}`` (how many US dollars
one unit buys; fixed rates, so a test can recompute every conversion), 404 for a currency it
does not know. ``GET /health`` answers once it serves (with ``RATES_INSTANCE``, if set).
``GET /calls`` says what it was asked: the ``x-request-id`` header of every rate request (the
handlers send their message's idempotency key), so a test can see that every message used
the dependency.

``RATES_TEST_HOLD_AFTER=K``, a test hook only: after K rate requests, the next ones wait
(``held`` in ``/calls`` counts them) until ``POST /release``, so a test can stop the consumer
mid-run, at a moment it knows, and kill it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

# US dollars per unit of the currency.
RATES: dict[str, Decimal] = {
    "USD": Decimal("1"),
    "EUR": Decimal("1.0850"),
    "GBP": Decimal("1.2700"),
    "CHF": Decimal("1.1300"),
    "JPY": Decimal("0.0067"),
}


class _State:
    def __init__(self, hold_after: int | None) -> None:
        self.calls: Counter[str] = Counter()  # x-request-id -> rate requests
        self.total = 0
        self.held = 0
        self.hold_after = hold_after
        self.released = asyncio.Event()


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    hold = os.environ.get("RATES_TEST_HOLD_AFTER", "")
    app.state.rates = _State(int(hold) if hold else None)
    yield


async def rate(request: Request) -> JSONResponse:
    s: _State = request.app.state.rates
    s.calls[request.headers.get("x-request-id", "")] += 1
    s.total += 1
    if s.hold_after is not None and s.total > s.hold_after and not s.released.is_set():
        s.held += 1
        try:
            await s.released.wait()
        finally:
            s.held -= 1
    currency = request.path_params["currency"].upper()
    usd = RATES.get(currency)
    if usd is None:
        return JSONResponse({"error": f"unknown currency {currency}"}, status_code=404)
    return JSONResponse({"currency": currency, "usd": str(usd)})


async def calls(request: Request) -> JSONResponse:
    s: _State = request.app.state.rates
    return JSONResponse({"total": s.total, "held": s.held, "by_request": dict(s.calls)})


async def release(request: Request) -> JSONResponse:
    s: _State = request.app.state.rates
    if s.hold_after is None:
        return JSONResponse({"error": "RATES_TEST_HOLD_AFTER is not set"}, status_code=404)
    s.released.set()
    return JSONResponse({"released": True})


async def health(request: Request) -> JSONResponse:
    # ``instance``: RATES_INSTANCE, so a test knows it reached its own server on that port.
    return JSONResponse({"ok": True, "instance": os.environ.get("RATES_INSTANCE", "")})


app = Starlette(
    routes=[
        Route("/rates/{currency}", rate),
        Route("/calls", calls),
        Route("/release", release, methods=["POST"]),
        Route("/health", health),
    ],
    lifespan=lifespan,
)
