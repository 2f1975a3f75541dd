"""The payments service: settle each PaymentRequested exactly once.

Run it with ``consumer run handlers.app:app --workers 3``.
"""

from __future__ import annotations

from pathlib import Path

from consumer import App, Context, Reject
from handlers import gateway
from schemas.payments import PaymentRequested, PaymentSettled, Receipt

REQUESTED = "payments.requested"
SETTLED = "payments.settled"

app = App("payments", migrations=[Path(__file__).parent / "migrations"])


@app.handler(
    REQUESTED,
    schema=PaymentRequested,
    key=lambda p: p.payment_id,
    hash_exclude={"sent_at", "trace_id"},
)
async def settle(p: PaymentRequested, ctx: Context) -> Receipt:
    """Apply the payment to the account, or reject an overdraft for good."""
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
        # Definite: rolled back to the savepoint, recorded as rejected, dead-lettered.
        raise Reject(f"overdraft: balance would be {balance} cents")
    tenant = ctx.message.header_str("tenant") or ""
    await ctx.db.execute(
        "INSERT INTO ledger (payment_id, account, cents, tenant) VALUES ($1, $2, $3, $4)",
        p.payment_id,
        p.account,
        p.cents,
        tenant,
    )
    ref = await gateway.charge(ctx.db, ctx.idempotency_key, p.account, p.cents)
    ctx.publish(
        SETTLED,
        PaymentSettled(
            payment_id=p.payment_id, account=p.account, cents=p.cents, balance_cents=balance
        ),
        key=p.account,
    )
    return Receipt(
        payment_id=p.payment_id,
        account=p.account,
        cents=p.cents,
        balance_cents=balance,
        gateway_ref=ref,
    )
