"""Payments messages, version 1.

``PaymentRequested`` arrives as msgpack or JSON (by its ``content-type`` header). ``sent_at``
and ``trace_id`` are transport details: the handler leaves them out of the payload hash, so a
resend with a new timestamp is still the same request. A breaking change gets a new
``schema_version`` and a new model; a compatible one adds an optional field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

Currency = Literal["EUR", "USD", "GBP"]


class PaymentRequested(BaseModel):
    """A client asks to move ``cents`` on ``account``; ``payment_id`` is its idempotency key."""

    schema_version: Literal[1] = 1
    payment_id: str = Field(min_length=1, max_length=128)
    account: str = Field(min_length=1, max_length=64)
    cents: int = Field(description="positive credits the account, negative debits it")
    currency: Currency = "EUR"
    memo: str = Field(default="", max_length=200)
    sent_at: datetime | None = None
    trace_id: str | None = None


class Receipt(BaseModel):
    """The handler's result: stored in the inbox and sent to ``reply-to`` when asked."""

    schema_version: Literal[1] = 1
    payment_id: str
    account: str
    cents: int
    balance_cents: int
    gateway_ref: str


class PaymentSettled(BaseModel):
    """The event published (through the outbox) once a payment is applied."""

    schema_version: Literal[1] = 1
    payment_id: str
    account: str
    cents: int
    balance_cents: int
