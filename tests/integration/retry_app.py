"""A worker process for the retry-topic crash tests.

``python -m tests.integration.retry_app GROUP TOPIC TABLE GATE`` runs one Worker whose handler
has ``retry="topics"`` and fails transiently (``Retry``) while table GATE holds no row: the
test opens the gate by inserting one. Each applied key inserts one row into TABLE (no unique
constraint: a second effect shows). ``DEDUP_TEST_FAULTS`` is read here, as the test entry
point consumer/testing/faulty.py does.
"""

from __future__ import annotations

import asyncio
import os
import sys

from consumer import App, Context, Retry
from consumer.runtime.worker import Worker
from consumer.testing import faults
from tests.integration.dedup_support import Pay


def build_app(group: str, topic: str, table: str, gate: str) -> App:
    app = App(group)

    @app.handler(topic, schema=Pay, key=lambda p: p.id, retry="topics")
    async def handle(p: Pay, ctx: Context) -> str:
        if await ctx.db.fetchval(f"SELECT count(*) FROM {gate}") == 0:
            raise Retry(reason="gate closed")
        await ctx.db.execute(f"INSERT INTO {table} (k, v) VALUES ($1, $2)", p.id, str(ctx.attempt))
        return "ok"

    return app


if __name__ == "__main__":
    group, topic, table, gate = sys.argv[1:5]
    faults.configure(os.environ.get("DEDUP_TEST_FAULTS", ""))
    asyncio.run(Worker(build_app(group, topic, table, gate)).run())
