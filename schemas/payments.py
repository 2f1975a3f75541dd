"""Payments messages, version 1.

``PaymentRequested`` arrives as msgpack or JSON. ``sent_at`` and ``trace_id`` are transport
details and are excluded from the payload hash by the handler.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class PaymentRequested(BaseModel):
    schema_version: Literal[1] = 1
    payment_id: str = Field(min_length=1, max_length=128)
    account: str = Field(min_length=1, max_length=64)
    cents: int = Field(description="positive credits the account, negative debits it")
    currency: Literal["EUR", "USD", "GBP"] = "EUR"
    memo: str = ""
    sent_at: datetime | None = None
    trace_id: str | None = None


class Receipt(BaseModel):
    schema_version: Literal[1] = 1
    payment_id: str
    account: str
    cents: int
    balance_cents: int
    gateway_ref: str


class PaymentSettled(BaseModel):
    schema_version: Literal[1] = 1
    payment_id: str
    account: str
    cents: int
    balance_cents: int
