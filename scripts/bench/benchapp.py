"""The framework legs' applications: a ledger row and one published message per new key.

The same work the naive leg does by hand (ledger row + outbox row per new key), so the legs
differ only in how duplicates are kept out and how the I/O is batched. ``build_app``: the
per-message handler (``framework``); ``build_batch_app``: the same as a batch handler
(``framework_batch``), its ledger rows in one ``unnest`` statement per batch and its messages
in one ``publish_many`` call, as the competent leg writes them.
"""

from __future__ import annotations

from typing import Any

from consumer import App, BatchContext, Context, Item, Settings
from schemas.payments import PaymentRequested

LEDGER_INSERT = "INSERT INTO bench_ledger (leg, key, account, cents) VALUES ($1, $2, $3, $4)"
LEDGER_INSERT_MANY = (
    "INSERT INTO bench_ledger (leg, key, account, cents) "
    "SELECT $1, * FROM unnest($2::text[], $3::text[], $4::bigint[])"
)


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
        # Its status is not read: deferred (sent now on the guarded path; queued and sent
        # pipelined with the batch's rows on the optimistic one, docs/handlers.md).
        await ctx.db.defer(LEDGER_INSERT, group, p.payment_id, p.account, p.cents)
        ctx.publish(
            out_topic,
            {"payment_id": p.payment_id, "account": p.account, "cents": p.cents},
            key=p.account,
        )
        return {"payment_id": p.payment_id, "cents": p.cents}

    return app


def build_batch_app(group: str, topic: str, out_topic: str, settings: Settings) -> App:
    """``build_app``'s work as a batch handler: set-based, same rows, same results."""
    app = App(group, settings=settings)

    @app.batch_handler(
        topic,
        schema=PaymentRequested,
        key=lambda p: p.payment_id,
        hash_exclude={"sent_at", "trace_id"},
        name=f"{group}.settle",  # the per-message app's namespace: the same inbox rows
    )
    async def settle_many(
        batch: list[Item[PaymentRequested]], ctx: BatchContext
    ) -> list[dict[str, Any]]:
        ps = [it.payload for it in batch]
        await ctx.db.execute(
            LEDGER_INSERT_MANY,
            group,
            [p.payment_id for p in ps],
            [p.account for p in ps],
            [p.cents for p in ps],
        )
        ctx.publish_many(
            out_topic,
            batch,
            lambda it: {
                "payment_id": it.payload.payment_id,
                "account": it.payload.account,
                "cents": it.payload.cents,
            },
            key=lambda it: it.payload.account,
        )
        return [{"payment_id": p.payment_id, "cents": p.cents} for p in ps]

    return app
