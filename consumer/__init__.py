"""dedup-consumer: Kafka handlers that take effect exactly once.

The public face of the package; everything else is internal::

    from consumer import App, Context, Reject

    app = App("payments")

    @app.handler("payments.requested", schema=PaymentRequested, key=lambda p: p.payment_id)
    async def settle(p: PaymentRequested, ctx: Context) -> Receipt: ...

    @app.batch_handler("payments.bulk", schema=PaymentRequested, key=lambda p: p.payment_id)
    async def settle_many(batch: list[Item[PaymentRequested]], ctx: BatchContext) -> list[Receipt]:
        ...

Outside a handler (a web endpoint), :class:`Outbox` writes an event in your own transaction::

    async with conn.transaction():
        await conn.execute("INSERT INTO orders ...")
        await Outbox(conn, source="orders-api").publish("order.created", event, key=order_id)
"""

from consumer.app import App
from consumer.batch_handler import BatchContext, BatchHandler, Item
from consumer.codecs.registry import Codec
from consumer.context import Context, Database
from consumer.errors import (
    BadKey,
    ConfigError,
    ConsumerError,
    DecodeError,
    HandlerSignal,
    InvalidMessage,
    LeaseBusy,
    LifespanError,
    MigrationMismatch,
    MissingKey,
    Reject,
    RequestTimeout,
    Retry,
    SchemaError,
    ShutdownFailed,
    StartupFailed,
    StoreUnavailable,
    TransientError,
)
from consumer.handler import Handler
from consumer.message import Message
from consumer.middleware import CallNext, Middleware, MiddlewareMisuse
from consumer.outbox.writer import Outbox, OutboxError
from consumer.requester import Reply, Requester, request
from consumer.runtime.outcomes import Outcome
from consumer.settings import Settings, load_settings

__all__ = [
    "App",
    "BadKey",
    "BatchContext",
    "BatchHandler",
    "CallNext",
    "Codec",
    "ConfigError",
    "ConsumerError",
    "Context",
    "Database",
    "DecodeError",
    "Handler",
    "HandlerSignal",
    "InvalidMessage",
    "Item",
    "LeaseBusy",
    "LifespanError",
    "Message",
    "Middleware",
    "MiddlewareMisuse",
    "MigrationMismatch",
    "MissingKey",
    "Outbox",
    "OutboxError",
    "Outcome",
    "Reject",
    "Reply",
    "RequestTimeout",
    "Requester",
    "Retry",
    "SchemaError",
    "Settings",
    "ShutdownFailed",
    "StartupFailed",
    "StoreUnavailable",
    "TransientError",
    "load_settings",
    "request",
]
__version__ = "0.1.0"
