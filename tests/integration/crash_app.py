"""A worker process for the crash tests.

``python -m tests.integration.crash_app GROUP TOPIC TABLE`` runs one Worker.

Settings come from the environment, and ``DEDUP_TEST_FAULTS=after_commit=1`` (read here, as
the test entry point consumer/testing/faulty.py does) makes the process kill itself (exit
137) right after its first database commit, before the Kafka offset commit.
Each handled key inserts one row into TABLE (no unique constraint: a second effect shows).
"""

from __future__ import annotations

import asyncio
import os
import sys

from consumer import App, Context
from consumer.runtime.worker import Worker
from consumer.testing import faults
from tests.integration.dedup_support import Pay


def build_app(group: str, topic: str, table: str) -> App:
    app = App(group)

    @app.handler(topic, schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> str:
        await ctx.db.execute(f"INSERT INTO {table} (k, v) VALUES ($1, $2)", p.id, str(ctx.attempt))
        return "ok"

    return app


if __name__ == "__main__":
    group, topic, table = sys.argv[1:4]
    faults.configure(os.environ.get("DEDUP_TEST_FAULTS", ""))
    asyncio.run(Worker(build_app(group, topic, table)).run())
