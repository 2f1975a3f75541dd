"""The HTTP side of the orders example: ``POST /orders`` saves the order and its event at once.

    uvicorn handlers.orders.web:app --port 8000

The order row and the ``order.created`` outbox row are written in one PostgreSQL transaction
(consumer.Outbox): both commit or neither does, so there is no order without its event and no
event without its order, whatever dies when. The relay (any worker of
handlers/orders/ledger.py, or ``consumer relay``) publishes the event after the commit; this
process never talks to Kafka.

``order_id`` is the client's idempotency key: a resend of a committed order answers 200 and
publishes nothing; the same id with another body answers 409.

Environment: ``CONSUMER_POSTGRES_DSN`` (the framework's database, where ``dedup.outbox``
lives), ``ORDERS_TOPIC_PREFIX`` (as the ledger's). ``ORDERS_TEST_HOLD_BEFORE_COMMIT``, a test
hook only: an order whose id starts with it waits forever after both writes, before the
commit, so a test can kill the server there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from consumer import Outbox
from handlers.orders.ledger import created_topic
from schemas.orders import OrderCreated, PlaceOrder

SOURCE = "orders-api"  # the outbox source: idempotency keys read orders-api:<order id>
APPLICATION_NAME = "orders-web"  # in pg_stat_activity, so a test can see a request's transaction


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    app.state.pool = await asyncpg.create_pool(
        os.environ["CONSUMER_POSTGRES_DSN"],
        min_size=1,
        max_size=10,
        server_settings={"application_name": APPLICATION_NAME},
    )
    app.state.topic = created_topic(os.environ.get("ORDERS_TOPIC_PREFIX", ""))
    app.state.hold = os.environ.get("ORDERS_TEST_HOLD_BEFORE_COMMIT", "")
    try:
        yield
    finally:
        await app.state.pool.close()


async def _hold(order_id: str) -> None:
    # The test hook: both rows written, the transaction open, this request never finishes.
    print(f"orders-web: holding order {order_id} before its commit", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


async def create_order(request: Request) -> JSONResponse:
    try:
        order = PlaceOrder.model_validate(await request.json())
    except (ValidationError, ValueError) as exc:
        return JSONResponse({"error": str(exc).splitlines()[0]}, status_code=422)
    state: Any = request.app.state
    async with state.pool.acquire() as conn, conn.transaction():
        saved = await conn.fetchval(
            "INSERT INTO orders (order_id, customer, cents) VALUES ($1, $2, $3)"
            " ON CONFLICT (order_id) DO NOTHING RETURNING true",
            order.order_id,
            order.customer,
            order.cents,
        )
        if not saved:
            return await _resent(conn, order)
        event = OrderCreated(order_id=order.order_id, customer=order.customer, cents=order.cents)
        ik = await Outbox(conn, source=SOURCE).publish(
            state.topic, event, key=order.order_id, idempotency_key=order.order_id
        )
        if state.hold and order.order_id.startswith(state.hold):
            await _hold(order.order_id)
    return JSONResponse({"order_id": order.order_id, "idempotency_key": ik}, status_code=201)


async def _resent(conn: Any, order: PlaceOrder) -> JSONResponse:
    """A resend: the order (and its event) committed before; same body 200, else 409."""
    row = await conn.fetchrow(
        "SELECT customer, cents FROM orders WHERE order_id = $1", order.order_id
    )
    if row is not None and (row["customer"], row["cents"]) == (order.customer, order.cents):
        return JSONResponse({"order_id": order.order_id, "created": False}, status_code=200)
    return JSONResponse(
        {"error": f"order {order.order_id!r} exists with another body"}, status_code=409
    )


async def health(request: Request) -> JSONResponse:
    await request.app.state.pool.fetchval("SELECT 1")
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[Route("/orders", create_order, methods=["POST"]), Route("/health", health)],
    lifespan=lifespan,
)
