"""The app every contract scenario runs: one DB-free handler whose effects are transactional.

Its only side effect is ``ctx.publish``, which lands in the outbox of the batch transaction on
every backend, so "published once" means "took effect once" everywhere. ``calls`` counts
handler runs outside any transaction (a run that was rolled back still counts), which is how
a scenario tells "ran twice, took effect once" from "ran once".
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import BaseModel

from consumer import App, Context, Reject, Settings, TransientError


class Item(BaseModel):
    id: str
    amount: int
    reject: bool = False
    fail_first: bool = False


def item(key: str, amount: int = 1, **flags: bool) -> dict[str, Any]:
    return {"id": key, "amount": amount, **flags}


def make_app(
    group: str, topic: str, out_topic: str, calls: Counter[str], settings: Settings
) -> App:
    app = App(group, settings=settings)

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
