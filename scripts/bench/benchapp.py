"""The framework leg's application: one handler writing a ledger row and publishing once.

The same work the naive leg does by hand (ledger row + outbox row per new key), so the two
legs differ only in how duplicates are kept out and how the I/O is batched.
"""

from __future__ import annotations

from typing import Any

from consumer import App, Context, Settings
from schemas.payments import PaymentRequested

LEDGER_INSERT = "INSERT INTO bench_ledger (leg, key, account, cents) VALUES ($1, $2, $3, $4)"


def build_app(group: str, topic: str, out_topic: str, settings: Settings) -> App:
    """An App in consumer group ``group`` consuming ``topic``; its ledger rows carry ``group``."""
    app = App(group, settings=settings)

    @app.handler(
        topic,
        schema=PaymentRequested,
        key=lambda p: p.payment_id,
        hash_exclude={"sent_at", "trace_id"},
    )
    async def settle(p: PaymentRequested, ctx: Context) -> dict[str, Any]:
        await ctx.db.execute(LEDGER_INSERT, group, p.payment_id, p.account, p.cents)
        ctx.publish(
            out_topic,
            {"payment_id": p.payment_id, "account": p.account, "cents": p.cents},
            key=p.account,
        )
        return {"payment_id": p.payment_id, "cents": p.cents}

    return app
