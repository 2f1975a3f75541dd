"""The app every contract scenario runs: one DB-free handler whose effects are transactional.

Its only side effect is ``ctx.publish``, which lands in the outbox of the batch transaction on
every backend, so "published once" means "took effect once" everywhere. ``calls`` counts
handler runs outside any transaction (a run that was rolled back still counts), which is how
a scenario tells "ran twice, took effect once" from "ran once".

``kind="batch"`` is the same handler as a batch handler (consumer/batch_handler.py): every
scenario must observe exactly the same outcomes, records and outbox rows. It also counts its
calls by batch size in ``calls["<batch of n>"]``, and honours the batch-only flags
(``fail_batch``: the whole call raises; ``hang_batch``: the whole call never returns, so the
handler timeout fires; both only when the call has more than one item).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel

from consumer import (
    App,
    BatchContext,
    Context,
    Reject,
    Retry,
    Settings,
    TransientError,
)
from consumer import Item as BatchItem

Kind = Literal["handler", "batch"]


class Item(BaseModel):
    id: str
    amount: int
    reject: bool = False
    fail_first: bool = False
    fail_batch: bool = False
    hang_batch: bool = False


def item(key: str, amount: int = 1, **flags: bool) -> dict[str, Any]:
    return {"id": key, "amount": amount, **flags}


def make_app(
    group: str,
    topic: str,
    out_topic: str,
    calls: Counter[str],
    settings: Settings,
    kind: Kind = "handler",
) -> App:
    app = App(group, settings=settings)
    if kind == "batch":
        _batch_subject(app, topic, out_topic, calls)
        return app

    @app.handler(topic, schema=Item, key=lambda p: p.id)
    async def handle(p: Item, ctx: Context) -> dict[str, Any]:
        calls[p.id] += 1
        # Published before any failure below: a rolled-back message must publish nothing.
        ctx.publish(out_topic, {"id": p.id, "amount": p.amount}, key=p.id)
        if p.fail_first and ctx.attempt == 1:
            raise TransientError("the first attempt fails")
        if p.reject:
            raise Reject(f"refused {p.id}")
        return {"id": p.id, "amount": p.amount, "attempt": ctx.attempt}

    return app


def _batch_subject(app: App, topic: str, out_topic: str, calls: Counter[str]) -> None:
    # Short enough for a scenario to see the timeout fire; the contract's other runs are
    # far shorter (no I/O in the handler).
    @app.batch_handler(topic, schema=Item, key=lambda p: p.id, timeout_s=2)
    async def handle(batch: list[BatchItem[Item]], ctx: BatchContext) -> list[Any]:
        calls[f"<batch of {len(batch)}>"] += 1
        for it in batch:
            calls[it.payload.id] += 1
        # One publish call for the batch, before any failure: rolled back with the call.
        ctx.publish_many(
            out_topic,
            batch,
            lambda it: {"id": it.payload.id, "amount": it.payload.amount},
            key=lambda it: it.payload.id,
        )
        if len(batch) > 1 and any(it.payload.fail_batch for it in batch):
            raise RuntimeError("the batch call fails")
        if len(batch) > 1 and any(it.payload.hang_batch for it in batch):
            await asyncio.Event().wait()  # never set: only the timeout ends this call
        results: list[Any] = []
        for it in batch:
            p = it.payload
            if p.fail_first and it.attempt == 1:
                results.append(Retry(reason="the first attempt fails"))
            elif p.reject:
                ctx.reject(it, f"refused {p.id}")
                results.append(None)
            else:
                results.append({"id": p.id, "amount": p.amount, "attempt": it.attempt})
        return results
