"""The payments service: settle each ``PaymentRequested`` exactly once.

A request credits (positive ``cents``) or debits (negative) an account. In the batch's
transaction the handler moves the balance, writes a ledger row, charges the stand-in gateway
with the message's idempotency key, and publishes ``PaymentSettled`` through the outbox: all of
it takes effect once, or none of it does. An overdraft is rejected for good (recorded,
dead-lettered, and a resend gets the same answer). A request with a ``reply-to`` header is
answered there with the ``Receipt`` (or the rejection) by the framework, duplicates included.

Run it with ``consumer run handlers.app:app --workers 3``.

``PAYMENTS_TOPIC_PREFIX`` (default empty) puts the topics and the consumer group under a
prefix, one deployment per prefix; ``make demo`` gives each run its own, so runs never share
topics, offsets or idempotency keys.
"""

from __future__ import annotations

import os
from pathlib import Path

from consumer import App, Context, Reject
from handlers import gateway
from schemas.payments import PaymentRequested, PaymentSettled, Receipt

PREFIX = os.environ.get("PAYMENTS_TOPIC_PREFIX", "")
REQUESTED = f"{PREFIX}payments.requested"
SETTLED = f"{PREFIX}payments.settled"

# Scoped "payments" whatever the prefix: every deployment shares these tables, and the
# migration history must not depend on the group's name.
app = App(f"{PREFIX}payments", migrations={"payments": Path(__file__).parent / "migrations"})


@app.handler(
    REQUESTED,
    schema=PaymentRequested,
    # The payment id is the client's idempotency key: a resend, however encoded, is the same
    # payment; the same id with a different body is a conflict, never applied.
    key=lambda p: p.payment_id,
    # Transport details that differ between resends of one logical request.
    hash_exclude={"sent_at", "trace_id"},
    # Declared for `consumer topics` (lists and creates it) and `consumer asyncapi` (its
    # channel and PaymentSettled's schema, docs/asyncapi.md).
    publishes={SETTLED: PaymentSettled},
)
async def settle(p: PaymentRequested, ctx: Context) -> Receipt:
    """Apply the payment to its account, or reject an overdraft for good."""
    balance = await ctx.db.fetchval(
        """
        INSERT INTO accounts (account, balance_cents) VALUES ($1, $2)
        ON CONFLICT (account) DO UPDATE SET balance_cents = accounts.balance_cents + $2
        RETURNING balance_cents
        """,
        p.account,
        p.cents,
    )
    if balance < 0:
        # Definite: the framework rolls back to this message's savepoint (the balance is
        # restored), records the rejection under the key and dead-letters the request.
        raise Reject(f"overdraft: balance would be {balance} cents")
    tenant = ctx.message.header_str("tenant") or ""
    await ctx.db.execute(
        "INSERT INTO ledger (payment_id, account, cents, tenant) VALUES ($1, $2, $3, $4)",
        p.payment_id,
        p.account,
        p.cents,
        tenant,
    )
    # An external call takes the same idempotency key, so a retried batch charges once.
    # The gateway's key space is global: ctx.outside_key scopes the key by namespace (handler
    # and tenant) unambiguously, so two tenants reusing a payment id, or tenant "org" with id
    # "7:inv-3" and tenant "org:7" with id "inv-3", never share one charge.
    ref = await gateway.charge(ctx.db, ctx.outside_key, p.account, p.cents)
    ctx.publish(
        SETTLED,
        PaymentSettled(
            payment_id=p.payment_id, account=p.account, cents=p.cents, balance_cents=balance
        ),
        key=p.account,
        headers={"tenant": tenant} if tenant else None,
    )
    return Receipt(
        payment_id=p.payment_id,
        account=p.account,
        cents=p.cents,
        balance_cents=balance,
        gateway_ref=ref,
    )
