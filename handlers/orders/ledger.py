"""The worker side of the orders example: apply each ``order.created`` once, as a shipment.

Run it with ``consumer run handlers.orders.ledger:app``; its relay (or ``consumer relay
handlers.orders.ledger:app``) also publishes the HTTP service's outbox rows, since they share
the database. ``consumer migrate handlers.orders.ledger:app`` creates the tables of both.

``ORDERS_TOPIC_PREFIX`` (default empty) puts the topic and the group under a prefix, one
deployment per prefix, as ``PAYMENTS_TOPIC_PREFIX`` does for handlers/app.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from consumer import App, Context, Settings
from schemas.orders import OrderCreated

MIGRATIONS = Path(__file__).parent / "migrations"


def created_topic(prefix: str) -> str:
    """The topic the HTTP service publishes to and this worker consumes."""
    return f"{prefix}order.created"


def make_app(prefix: str = "", settings: Settings | None = None) -> App:
    """The ledger app for one deployment (``prefix``); tests build their own."""
    app = App(f"{prefix}orders-ledger", settings=settings, migrations={"orders": MIGRATIONS})

    # key="header" (the default): the idempotency-key header the outbox gave the event,
    # ``orders-api:<order id>``, the same on every copy the relay sends.
    @app.handler(created_topic(prefix), schema=OrderCreated)
    async def ship(o: OrderCreated, ctx: Context) -> None:
        """Record the shipment of the order: once per order, however often it arrives."""
        await ctx.db.execute(
            "INSERT INTO shipments (order_id, customer, cents) VALUES ($1, $2, $3)",
            o.order_id,
            o.customer,
            o.cents,
        )

    return app


app = make_app(os.environ.get("ORDERS_TOPIC_PREFIX", ""))
