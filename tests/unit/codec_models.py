"""Models shared by the codec tests: the same payloads sent as JSON, msgpack, Avro, Protobuf."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from decimal import Decimal

from pydantic import BaseModel, Field


class Kind(enum.Enum):
    card = "card"
    bank = "bank"


class Line(BaseModel):
    sku: str
    qty: int


class Payment(BaseModel):
    id: uuid.UUID
    amount: Decimal = Field(max_digits=18, decimal_places=2)
    at: dt.datetime
    note: str | None = None
    tags: list[str] = []
    meta: dict[str, int] = {}
    kind: Kind = Kind.card
    day: dt.date
    raw: bytes = b""
    lines: list[Line] = []
    ratio: float = 0.0
    flag: bool = False


class Order(BaseModel):
    order_id: str
    qty: int
    total: Decimal = Field(decimal_places=4)


UTC = dt.UTC
PAYMENTS = [
    Payment(
        id=uuid.UUID(int=1),
        amount=Decimal("12.50"),
        at=dt.datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
        note="first",
        tags=["a", "b"],
        meta={"x": 1, "y": 0},
        kind=Kind.bank,
        day=dt.date(2024, 5, 1),
        raw=b"\x00ab\x10",  # UTF-8: JSON carries bytes as text
        lines=[Line(sku="s-1", qty=2), Line(sku="s-2", qty=0)],
        ratio=0.1,
        flag=True,
    ),
    Payment(
        id=uuid.UUID(int=2),
        amount=Decimal("0.01"),
        at=dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
        day=dt.date(1999, 12, 31),
    ),
    Payment(
        id=uuid.UUID(int=3),
        amount=Decimal("-9999999999999999.99"),
        at=dt.datetime(2030, 1, 1, tzinfo=UTC),
        day=dt.date(2030, 1, 1),
        note="",
        ratio=-2.5,
    ),
]
ORDERS = [
    Order(order_id="o-1", qty=3, total=Decimal("10.0000")),
    Order(order_id="o-2", qty=0, total=Decimal("0.0001")),
    Order(order_id="o-3", qty=-7, total=Decimal("123456789.5")),
]
