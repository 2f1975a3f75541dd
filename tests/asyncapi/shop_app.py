"""An app using everything ``consumer asyncapi`` describes (tests/asyncapi/test_asyncapi.py):
a handler with ``retry="topics"`` and declared publish targets (models with nested models,
a discriminated union, a tuple, a name two models share), a handler that replies with a model,
a batch handler keyed by the record key, a publish target without a model, and a publish
target that is also a source of the app.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from consumer import App, BatchContext, Context, Item

app = App("shop")

ORDERS = "shop.orders"
REFUNDS = "shop.refunds"
AUDIT = "shop.audit"
SHIPPED = "shop.shipped"
METRICS = "shop.metrics"


class Currency(StrEnum):
    EUR = "EUR"
    USD = "USD"


class Line(BaseModel):
    sku: str = Field(pattern=r"^[A-Z0-9-]+$")
    qty: int = Field(ge=1)
    price: Decimal


class Card(BaseModel):
    kind: Literal["card"] = "card"
    last4: str = Field(min_length=4, max_length=4)


class Transfer(BaseModel):
    kind: Literal["transfer"] = "transfer"
    iban: str


class Order(BaseModel):
    """An order to ship."""

    order_id: str
    lines: list[Line] = Field(min_length=1)
    currency: Currency = Currency.EUR
    payment: Annotated[Card | Transfer, Field(discriminator="kind")]
    window: tuple[datetime, datetime] | None = None
    tags: dict[str, str] = {}


def _other_line() -> type[BaseModel]:
    class Line(BaseModel):  # the same name as the module's Line, another model
        parcel: str
        weight_g: int

    return Line


class Shipped(BaseModel):
    """Published once an order is shipped."""

    order_id: str
    parcels: list[_other_line()]  # type: ignore[valid-type]
    at: datetime


class Receipt(BaseModel):
    order_id: str
    total: Decimal


class Refund(BaseModel):
    order_id: str
    cents: int


class Audited(BaseModel):
    what: str


@app.handler(
    ORDERS,
    schema=Order,
    key="header",
    retry="topics",
    max_attempts=5,
    publishes={SHIPPED: Shipped, AUDIT: Audited},
)
async def ship(order: Order, ctx: Context) -> Receipt:
    ctx.publish(SHIPPED, Shipped(order_id=order.order_id, parcels=[], at=datetime.now()))
    ctx.publish(AUDIT, Audited(what=f"shipped {order.order_id}"))
    ctx.publish(METRICS, {"shipped": 1})
    return Receipt(order_id=order.order_id, total=sum(x.price * x.qty for x in order.lines))


@app.handler(REFUNDS, schema=Refund, key=lambda r: r.order_id, publishes=[METRICS, AUDIT])
def refund(r: Refund, ctx: Context) -> None:
    """A sync handler without a model to reply with; METRICS is declared without a model."""


@app.batch_handler(AUDIT, schema=Audited, key="record")
async def audit(batch: list[Item[Audited]], ctx: BatchContext) -> None:
    """Reads what the other handlers publish to AUDIT: a target that is also a source."""
