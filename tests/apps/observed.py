"""The app of the observability tests: applies, rejects on request, publishes one message.

``make_app`` builds one for an in-process test; the module's ``app`` is what
``python -m consumer run tests.apps.observed:app`` runs, named from the environment
(``OBSERVED_GROUP``, ``OBSERVED_TOPIC``, ``OBSERVED_OUT``) so that each test has its own.
"""

from __future__ import annotations

import os

from pydantic import BaseModel

from consumer import App, Context, Reject, Settings


class Order(BaseModel):
    n: int
    reject: bool = False


def make_app(group: str, topic: str, out: str, settings: Settings | None = None) -> App:
    """An app whose handler ``observe`` is named ``<group>.observe`` in metrics and logs."""
    app = App(group, settings=settings)

    @app.handler(topic, schema=Order, key="header")
    async def observe(p: Order, ctx: Context) -> int:
        if p.reject:
            raise Reject("asked to reject")
        ctx.publish(out, {"n": p.n}, key=ctx.idempotency_key)
        return p.n

    return app


app = make_app(
    os.environ.get("OBSERVED_GROUP", "observed"),
    os.environ.get("OBSERVED_TOPIC", "observed"),
    os.environ.get("OBSERVED_OUT", "observed.out"),
)
