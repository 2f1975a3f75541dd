"""An app with a lifespan, for tests/integration/test_lifespan.py's real worker processes.

The startup hook opens a resource (an asyncpg pool) into the typed container and leaves a
``started-<pid>`` file; the handler uses the container (``ctx.deps``) inside its effect; the
shutdown hook, after the drain, leaves ``stopped-<pid>`` with what the pool still answers,
then closes it. ``LIFESPAN_FAIL=1`` makes the startup hook raise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from pydantic import BaseModel

from consumer import App, Context

TABLE = os.environ.get("LIFESPAN_TABLE", "lifespan_effects")
DIR = Path(os.environ.get("LIFESPAN_DIR", "."))


@dataclass
class Deps:
    pool: asyncpg.Pool = field(init=False)
    label: str = ""


class Job(BaseModel):
    id: str


app = App(os.environ.get("LIFESPAN_GROUP", "lifespan"), deps=Deps)


@app.on_startup
async def open_pool(deps: Deps) -> None:
    if os.environ.get("LIFESPAN_FAIL"):
        raise ConnectionError("the ledger service is not reachable")
    deps.pool = await asyncpg.create_pool(os.environ["CONSUMER_POSTGRES_DSN"], min_size=1)
    deps.label = f"pool-{os.getpid()}"
    (DIR / f"started-{os.getpid()}").write_text(deps.label)


@app.on_shutdown
async def close_pool(deps: Deps) -> None:
    answer = await deps.pool.fetchval("SELECT count(*) FROM " + TABLE)
    (DIR / f"stopped-{os.getpid()}").write_text(f"{deps.label} {answer}")
    await deps.pool.close()


@app.handler(os.environ.get("LIFESPAN_TOPIC", "lifespan"), schema=Job, key=lambda j: j.id)
async def work(j: Job, ctx: Context[Deps]) -> str:
    one = await ctx.deps.pool.fetchval("SELECT 1")  # the resource, outside the transaction
    await ctx.db.execute(
        f"INSERT INTO {TABLE} (k, pid, label) VALUES ($1, $2, $3)",
        j.id,
        os.getpid(),
        f"{ctx.deps.label}/{one}",
    )
    return ctx.deps.label
