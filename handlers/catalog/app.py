"""The catalog sample: prices (Avro) and supplier quotes (JSON) converted to US dollars.

    consumer run handlers.catalog.app:app --workers 2

Each worker process opens one ``httpx.AsyncClient`` to the rates service at start (the
startup hook, which also checks the service answers) and closes it after its drain (the
shutdown hook); handlers reach it as ``ctx.deps.http``, typed by ``Context[Deps]``
(docs/lifespan.md). Every message asks the service for its currency's rate, then writes its
row with ``ctx.db``, in the message's transaction: applied once, however often it arrives
and whatever dies when. A price change also publishes ``PriceInUsd`` as Avro, through the
outbox. ``LogContext`` puts the message's key, topic and offset on the handlers' log lines;
``RateLimit`` keeps each worker from asking the rates service more than
``CATALOG_RATES_PER_S`` times a second per handler (docs/middleware.md).

Environment: ``CATALOG_RATES_URL`` (default ``http://127.0.0.1:8100``),
``CATALOG_HTTP_TIMEOUT_S`` (5), ``CATALOG_RATES_PER_S`` (100), ``CATALOG_TOPIC_PREFIX``
(default empty: topics and group under a prefix, one deployment per prefix, as
``ORDERS_TOPIC_PREFIX`` does for handlers/orders/), plus the framework's ``CONSUMER_*``.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx

from consumer import App, Context, Reject, Settings
from consumer.codecs.avro import CONTENT_AVRO, AvroCodec
from consumer.middlewares import LogContext, RateLimit
from schemas.catalog import PriceChanged, PriceInUsd, SupplierQuote

MIGRATIONS = Path(__file__).parent / "migrations"
CENT = Decimal("0.01")
# The rates service not answering, or answering an error status other than 404 (a 5xx, a 429),
# is transient: rolled back and retried, nothing recorded (docs/handlers.md,
# "Classification"). An unknown currency (404) is not: usd_rate rejects it.
UNREACHABLE = (httpx.TransportError, httpx.HTTPStatusError)

log = logging.getLogger("handlers.catalog")


def prices_topic(prefix: str = "") -> str:
    """Price changes, Avro (``content-type: application/avro``)."""
    return f"{prefix}catalog.prices"


def quotes_topic(prefix: str = "") -> str:
    """Supplier quotes, JSON (``content-type: application/json``)."""
    return f"{prefix}catalog.quotes"


def converted_topic(prefix: str = "") -> str:
    """What the price handler publishes: ``PriceInUsd``, Avro."""
    return f"{prefix}catalog.prices.usd"


def _rates_url() -> str:
    return os.environ.get("CATALOG_RATES_URL", "http://127.0.0.1:8100")


def _timeout_s() -> float:
    return float(os.environ.get("CATALOG_HTTP_TIMEOUT_S", "5"))


@dataclass
class Deps:
    """The app's dependency container: built once per worker process (``Deps()``, the
    settings read from the environment then), filled by the startup hook."""

    rates_url: str = field(default_factory=_rates_url)
    timeout_s: float = field(default_factory=_timeout_s)
    http: httpx.AsyncClient = field(init=False)  # set by open_http; a fake one in tests


async def open_http(deps: Deps) -> None:
    """Startup hook: the worker's one HTTP client to the rates service."""
    deps.http = httpx.AsyncClient(base_url=deps.rates_url, timeout=deps.timeout_s)
    try:  # fail at start (exit code RET_STARTUP, one line) rather than on every message
        (await deps.http.get("/health")).raise_for_status()
    except httpx.HTTPError as exc:
        await deps.http.aclose()
        raise ConnectionError(
            f"the rates service at {deps.rates_url} does not answer: {exc}"
        ) from None
    log.info("catalog: rates client open on %s", deps.rates_url)


async def close_http(deps: Deps) -> None:
    """Shutdown hook, after the drain: close the client."""
    await deps.http.aclose()
    log.info("catalog: rates client closed")


async def usd_rate(ctx: Context[Deps], currency: str) -> Decimal:
    """US dollars per unit of ``currency``, from the rates service (``ctx.deps.http``)."""
    r = await ctx.deps.http.get(f"/rates/{currency}", headers={"x-request-id": ctx.idempotency_key})
    if r.status_code == 404:
        raise Reject(f"unknown currency {currency}")  # recorded, dead-lettered, not retried
    r.raise_for_status()
    return Decimal(r.json()["usd"])


def make_app(
    prefix: str = "",
    *,
    settings: Settings | None = None,
    rates_url: str | None = None,
    rates_per_s: float = 100.0,
) -> App[Deps]:
    """The catalog app for one deployment (``prefix``); ``rates_url`` overrides
    ``CATALOG_RATES_URL``, read when a worker starts."""
    deps = Deps if rates_url is None else functools.partial(Deps, rates_url=rates_url)
    app = App(f"{prefix}catalog", deps=deps, settings=settings, migrations={"catalog": MIGRATIONS})
    avro = AvroCodec()  # schemas derived from the pydantic models
    app.codec(CONTENT_AVRO, avro)
    app.middleware(LogContext())  # first registered: outermost
    app.middleware(RateLimit(rates_per_s))

    app.on_startup(open_http)
    app.on_shutdown(close_http)

    @app.handler(
        prices_topic(prefix),
        schema=PriceChanged,
        key=lambda p: p.change_id,
        retry_on=UNREACHABLE,
        publishes=[converted_topic(prefix)],
    )
    async def convert_price(p: PriceChanged, ctx: Context[Deps]) -> dict[str, str]:
        rate = await usd_rate(ctx, p.currency)
        usd = (p.amount * rate).quantize(CENT)
        await ctx.db.execute(
            "INSERT INTO catalog_prices (change_id, sku, amount, currency, rate, usd)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            p.change_id,
            p.sku,
            p.amount,
            p.currency,
            rate,
            usd,
        )
        event = PriceInUsd(change_id=p.change_id, sku=p.sku, usd=usd)
        ctx.publish(converted_topic(prefix), event, key=p.sku, content_type=CONTENT_AVRO)
        log.info("price of %s: %s USD", p.sku, usd)  # carries key, topic, offset (LogContext)
        return {"usd": str(usd)}

    @app.handler(
        quotes_topic(prefix), schema=SupplierQuote, key=lambda q: q.quote_id, retry_on=UNREACHABLE
    )
    async def record_quote(q: SupplierQuote, ctx: Context[Deps]) -> dict[str, str]:
        rate = await usd_rate(ctx, q.currency)
        usd = (q.amount * rate).quantize(CENT)
        await ctx.db.execute(
            "INSERT INTO catalog_quotes (quote_id, supplier, sku, amount, currency, rate, usd)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            q.quote_id,
            q.supplier,
            q.sku,
            q.amount,
            q.currency,
            rate,
            usd,
        )
        return {"usd": str(usd)}

    return app


app = make_app(
    os.environ.get("CATALOG_TOPIC_PREFIX", ""),
    rates_per_s=float(os.environ.get("CATALOG_RATES_PER_S", "100")),
)
