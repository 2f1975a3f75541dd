"""Catalog messages, version 1: what the sample app (handlers/catalog/) reads and publishes.

``PriceChanged`` arrives as Avro (its schema derived from this model by
consumer/codecs/avro_schema.py), ``SupplierQuote`` as JSON; both carry an amount in a
foreign currency that the handler converts to US dollars with the rates service.
"""

from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, Field


class PriceChanged(BaseModel):
    """A shop's new list price for a SKU; ``change_id`` is the idempotency key."""

    change_id: str = Field(min_length=1, max_length=128)
    sku: str = Field(min_length=1, max_length=64)
    amount: Decimal = Field(gt=0, max_digits=12, decimal_places=2)
    currency: str = Field(min_length=3, max_length=3)


class SupplierQuote(BaseModel):
    """A supplier's quote for a SKU; ``quote_id`` is the idempotency key."""

    quote_id: str = Field(min_length=1, max_length=128)
    supplier: str = Field(min_length=1, max_length=64)
    sku: str = Field(min_length=1, max_length=64)
    amount: Decimal = Field(gt=0, max_digits=12, decimal_places=2)
    currency: str = Field(min_length=3, max_length=3)


class PriceInUsd(BaseModel):
    """Published (as Avro, through the outbox) for every price change applied."""

    change_id: str
    sku: str
    usd: Decimal = Field(max_digits=14, decimal_places=2)
