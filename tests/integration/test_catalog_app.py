"""The catalog sample's own tests, as its authors would write them: ``TestApp`` on PostgreSQL
(the handlers write with ``ctx.db``), the rates service replaced by a fake HTTP client.

``TestApp(app, db=..., deps=fake)`` hands the handlers ``fake`` as ``ctx.deps`` and does not
run the startup hooks (which would open a client to the real service, docs/lifespan.md).
The fake is an ``httpx.AsyncClient`` on ``httpx.MockTransport``, httpx's own way to answer
requests in-process (https://www.python-httpx.org/advanced/transports/#mock-transports).
The real service, real worker processes and a SIGKILL: test_catalog_sample.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from decimal import Decimal

import httpx
import pytest

from consumer import Outcome, Settings
from consumer.codecs.avro import CONTENT_AVRO
from consumer.errors import StartupFailed
from consumer.testing import TestApp, payload
from handlers.catalog.app import Deps, converted_topic, make_app, prices_topic, quotes_topic
from schemas.catalog import PriceChanged, PriceInUsd, SupplierQuote

pytestmark = pytest.mark.integration

RATES = {"EUR": "1.10", "GBP": "1.25"}


class FakeRates:
    """Answers ``GET /rates/<currency>`` from a table; records every request. ``fail_first``
    requests fail as if the service were down."""

    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[httpx.Request] = []
        self.fail_first = fail_first

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if len(self.requests) <= self.fail_first:
            raise httpx.ConnectError("connection refused", request=request)
        currency = request.url.path.rsplit("/", 1)[-1]
        if currency not in RATES:
            return httpx.Response(404, json={"error": f"unknown currency {currency}"})
        return httpx.Response(200, json={"currency": currency, "usd": RATES[currency]})

    def asked(self) -> list[str]:
        return [r.headers["x-request-id"] for r in self.requests]


@pytest.fixture
def fake() -> FakeRates:
    return FakeRates()


@pytest.fixture
async def catalog(settings: Settings, fake: FakeRates) -> AsyncIterator[Callable[[], TestApp]]:
    """``catalog()``: the app under TestApp, on PostgreSQL, with the fake as its HTTP client."""
    clients: list[httpx.AsyncClient] = []

    def make() -> TestApp:
        deps = Deps()
        deps.http = httpx.AsyncClient(transport=httpx.MockTransport(fake), base_url="http://rates")
        clients.append(deps.http)
        return TestApp(make_app(), db=settings.postgres_dsn, deps=deps)

    yield make
    for c in clients:
        await c.aclose()


def price(change_id: str = "c-1", amount: str = "10.00", currency: str = "EUR") -> PriceChanged:
    return PriceChanged(change_id=change_id, sku="tea", amount=Decimal(amount), currency=currency)


def quote(quote_id: str = "q-1", amount: str = "200.00", currency: str = "GBP") -> SupplierQuote:
    return SupplierQuote(
        quote_id=quote_id,
        supplier="leaf & co",
        sku="tea",
        amount=Decimal(amount),
        currency=currency,
    )


async def test_an_avro_price_is_converted_with_the_rates_service(catalog, fake):
    async with catalog() as t:
        r = await t.send(prices_topic(), price(amount="10.00"), content_type=CONTENT_AVRO)
        assert (r.outcome, r.result) == (Outcome.APPLIED, {"usd": "11.00"})
        rows = await t.db.fetch("SELECT change_id, rate, usd FROM catalog_prices")
        assert [tuple(row) for row in rows] == [("c-1", Decimal("1.10"), Decimal("11.00"))]
        [event] = t.published(converted_topic())
        assert event.header_str("content-type") == CONTENT_AVRO
        sent = payload(event, PriceInUsd, codecs=t.app.codecs)
        assert sent == PriceInUsd(change_id="c-1", sku="tea", usd=Decimal("11.00"))
    assert fake.asked() == ["c-1"]  # the handler used the dependency it was given
    assert str(fake.requests[0].url) == "http://rates/rates/EUR"


async def test_a_resent_quote_is_applied_once_and_asks_the_service_once(catalog, fake):
    async with catalog() as t:
        first = await t.send(quotes_topic(), quote(), content_type="application/json")
        again = await t.redeliver()
        assert (first.outcome, again.outcome) == (Outcome.APPLIED, Outcome.DUPLICATE)
        assert again.result == {"usd": "250.00"}  # the first run's answer
        assert await t.db.fetchval("SELECT count(*) FROM catalog_quotes") == 1
    assert fake.asked() == ["q-1"]


async def test_the_same_price_as_json_is_a_duplicate(catalog, fake):
    async with catalog() as t:
        await t.send(prices_topic(), price(), content_type=CONTENT_AVRO)
        as_json = json.dumps(price().model_dump(mode="json")).encode()
        again = await t.send(prices_topic(), as_json, content_type="application/json")
        assert again.outcome is Outcome.DUPLICATE
        assert await t.db.fetchval("SELECT count(*) FROM catalog_prices") == 1
        assert len(t.published(converted_topic())) == 1


async def test_an_unknown_currency_is_rejected_and_dead_lettered(catalog, fake):
    async with catalog() as t:
        r = await t.send(prices_topic(), price(currency="XXX"), content_type=CONTENT_AVRO)
        assert (r.outcome, r.reason) == (Outcome.REJECTED, "unknown currency XXX")
        [dead] = t.dead_letters(prices_topic())
        assert dead.header_str("x-reason") == "rejected"
        assert await t.db.fetchval("SELECT count(*) FROM catalog_prices") == 0
        assert t.published(converted_topic()) == []


@pytest.mark.parametrize("fake", [FakeRates(fail_first=1)], ids=["down-once"])
async def test_the_service_down_is_retried_and_the_row_written_once(catalog, fake):
    async with catalog() as t:
        r = await t.send(quotes_topic(), quote(), content_type="application/json")
        assert (r.outcome, r.handler_calls) == (Outcome.APPLIED, 2)
        assert await t.db.fetchval("SELECT count(*) FROM catalog_quotes") == 1
    assert fake.asked() == ["q-1", "q-1"]


async def test_a_crash_before_commit_asks_twice_and_writes_once(catalog, fake):
    async with catalog() as t:
        t.crash_before_commit()
        r = await t.send(prices_topic(), price(), content_type=CONTENT_AVRO)
        assert (r.crashed, r.outcome, r.handler_calls) == ("before_commit", Outcome.APPLIED, 2)
        assert await t.db.fetchval("SELECT count(*) FROM catalog_prices") == 1
        assert len(t.published(converted_topic())) == 1
    assert fake.asked() == ["c-1", "c-1"]  # outside the transaction: a read, safe to repeat


async def test_without_a_replacement_the_startup_hook_needs_the_real_service(settings):
    # Nothing listens on port 9 (discard) here: the hook fails, as a worker's would.
    app = make_app(rates_url="http://127.0.0.1:9")
    with pytest.raises(StartupFailed, match="open_http raised ConnectionError"):
        async with TestApp(app, db=settings.postgres_dsn):
            pass
