"""The downstream service of the chaos campaign: consumes what the payments relay published.

``payments.settled`` is delivered at least once (a relay killed after the broker's ack
publishes its rows again, with the same ``idempotency-key`` header). This app keys on that
header, so each settled payment must land exactly once in ``chaos_downstream_effects``, a
table without a unique constraint where a double-apply would show.

Run: ``python -m consumer run scripts.chaos.downstream:app``.
"""

from __future__ import annotations

from pathlib import Path

from consumer import App, Context
from handlers.app import SETTLED
from schemas.payments import PaymentSettled

app = App(
    "chaos-downstream",
    migrations={"chaos-downstream": Path(__file__).parent / "chaos_downstream"},
)


@app.handler(SETTLED, schema=PaymentSettled, key="header")
async def record_settlement(p: PaymentSettled, ctx: Context) -> dict[str, str]:
    """Append the settlement to the effects log (no unique constraint, on purpose)."""
    await ctx.db.execute(
        """
        INSERT INTO chaos_downstream_effects
            (namespace, idempotency_key, payment_id, account, cents, source)
        VALUES ($1, $2, $3, $4, $5, $6)
        """,
        ctx.namespace,
        ctx.idempotency_key,
        p.payment_id,
        p.account,
        p.cents,
        ctx.message.source,
    )
    return {"payment_id": p.payment_id}
