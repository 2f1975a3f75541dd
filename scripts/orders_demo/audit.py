"""The orders audit: every order saved has its event, and the event was applied exactly once.

Read from the database (``orders``, ``shipments``, ``dedup.outbox``) and the topic, scoped to
one run by its order-id prefix. ``shipments`` has no unique constraint, so an event applied
twice shows as two rows (scripts/toolkit/audit.py holds them against the orders).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from rich.table import Table

from handlers.orders.web import SOURCE
from scripts.toolkit.audit import LedgerAudit, audit_ledger


@dataclass
class OrdersAudit:
    """Orders against the events on the topic and the shipments the worker applied."""

    orders: int  # orders of the run in the database
    copies: int  # order.created records on the topic, copies included
    events: int  # distinct orders the topic announces
    pending: int  # outbox rows of the run not yet published
    ledger: LedgerAudit  # shipments held against the orders
    without_event: set[str] = field(default_factory=set)  # orders the topic never announced
    without_order: set[str] = field(default_factory=set)  # events of orders never saved
    bad_keys: int = 0  # records whose idempotency-key is not orders-api:<order id>

    @property
    def ok(self) -> bool:
        return (
            self.ledger.ok
            and not self.without_event
            and not self.without_order
            and not self.pending
            and not self.bad_keys
        )

    def rows(self) -> list[tuple[str, str, str, bool]]:
        """(check, expected, found, ok) for the table."""
        n, lg = self.orders, self.ledger
        return [
            ("orders saved (database)", "-", f"{n:,}", True),
            ("outbox rows still pending", "0", f"{self.pending:,}", not self.pending),
            ("orders announced on the topic", f"{n:,}", f"{self.events:,}", not self.without_event),
            (
                "events without an order",
                "0",
                f"{len(self.without_order):,}",
                not self.without_order,
            ),
            ("copies on the topic (relay resends)", f">= {n:,}", f"{self.copies:,}", True),
            ("idempotency-key not orders-api:<id>", "0", f"{self.bad_keys:,}", not self.bad_keys),
            ("orders shipped", f"{n:,}", f"{n - len(lg.missing):,}", not lg.missing),
            ("orders shipped twice", "0", f"{len(lg.twice):,}", not lg.twice),
            ("shipments unlike their order", "0", f"{sum(lg.altered.values()):,}", not lg.altered),
            ("shipments of no order", "0", f"{sum(lg.unexpected.values()):,}", not lg.unexpected),
        ]

    def table(self, title: str = "orders audit") -> Table:
        t = Table(title=title)
        for name in ("check", "expected", "found", ""):
            t.add_column(name, justify="left" if name == "check" else "right")
        for check, expected, found, ok in self.rows():
            t.add_row(check, expected, found, "[green]ok" if ok else "[bold red]FAIL")
        return t


def _event(record: Any) -> tuple[str, bool]:
    """The order id a record announces, and whether its idempotency key is the derived one."""
    order_id = str(msgpack.unpackb(record.value)["order_id"])
    headers = {k: v.decode() for k, v in record.headers}
    return order_id, headers.get("idempotency-key") == f"{SOURCE}:{order_id}"


async def audit_orders(conn: Any, records: Sequence[Any], prefix: str = "") -> OrdersAudit:
    """Hold the run's orders (ids starting with ``prefix``) against ``records`` (the topic's)
    and the ``shipments`` rows; ``conn`` is an asyncpg connection."""
    like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    orders = {
        r["order_id"]: (r["customer"], r["cents"])
        for r in await conn.fetch(
            "SELECT order_id, customer, cents FROM orders WHERE order_id LIKE $1", like
        )
    }
    shipments = [
        (r["order_id"], (r["customer"], r["cents"]))
        for r in await conn.fetch(
            "SELECT order_id, customer, cents FROM shipments WHERE order_id LIKE $1", like
        )
    ]
    pending = await conn.fetchval(
        "SELECT count(*) FROM dedup.outbox WHERE published_at IS NULL AND idempotency_key LIKE $1",
        f"{SOURCE}:{like}",
    )
    events = [_event(r) for r in records]
    announced = {order_id for order_id, _ in events}
    return OrdersAudit(
        orders=len(orders),
        copies=len(records),
        events=len(announced),
        pending=int(pending),
        ledger=audit_ledger(orders, shipments),
        without_event=set(orders) - announced,
        without_order=announced - set(orders),
        bad_keys=sum(1 for _, good in events if not good),
    )
