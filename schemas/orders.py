"""Orders messages, version 1: what the HTTP example (handlers/orders/) accepts and publishes.

``order_id`` is the client's idempotency key: a resent ``POST /orders`` with the same id and
body creates nothing new; the same id with another body is refused (409).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class PlaceOrder(BaseModel):
    """The body of ``POST /orders``."""

    order_id: str = Field(min_length=1, max_length=128)
    customer: str = Field(min_length=1, max_length=64)
    cents: int = Field(gt=0)


class OrderCreated(BaseModel):
    """Published through the outbox in the transaction that saved the order."""

    schema_version: Literal[1] = 1
    order_id: str
    customer: str
    cents: int
