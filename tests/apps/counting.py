"""A counting app for the multi-process tests: every applied message inserts one row.

``test_worker_effects`` has no unique constraint on purpose: a message applied twice shows up
as two rows. Topic, group and run id come from the environment, so each test has its own.

Two traps let a test pick the moment a process dies or freezes (the first process to reach a
trap writes its pid to ``$COUNTING_HOLD_DIR``; copies of the message do not trigger it again):

* ``hold_s > 0``: after its effect row is inserted, before the commit, the handler sleeps, so
  the test can SIGKILL that process in the middle of a batch (file ``held-<key>``);
* ``freeze``: the process SIGSTOPs itself at the start of its next batch transaction (file
  ``frozen-<key>``), once no other batch of it is inside one. It has fetched that batch and
  holds its leases but holds no database lock, so the rest of the group carries on without
  it; when it is resumed, its first act is to commit that stale batch late.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from pydantic import BaseModel

from consumer import App, Context, probe
from consumer.probe import Probe

TOPIC = os.environ.get("COUNTING_TOPIC", "counting")
RUN = os.environ.get("COUNTING_RUN", "local")
HOLD_DIR = os.environ.get("COUNTING_HOLD_DIR", "")
WORK_MS = float(os.environ.get("COUNTING_WORK_MS", "0"))

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS test_worker_effects (
    run        text    NOT NULL,
    k          text    NOT NULL,
    pid        integer NOT NULL,
    part       integer NOT NULL,
    at         timestamptz NOT NULL DEFAULT now()
)
"""


class Count(BaseModel):
    n: int
    hold_s: float = 0.0
    freeze: bool = False


app = App(os.environ.get("COUNTING_GROUP", "counting"))


def _claim(trap: str, key: str) -> bool:
    """True for the first process that reaches this trap (atomic across processes)."""
    if not HOLD_DIR:
        return False
    try:
        fd = os.open(Path(HOLD_DIR) / f"{trap}-{key}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


@app.handler(TOPIC, schema=Count, key="header")
async def count(p: Count, ctx: Context) -> int:
    await ctx.db.execute(
        "INSERT INTO test_worker_effects (run, k, pid, part) VALUES ($1, $2, $3, $4)",
        RUN,
        ctx.idempotency_key,
        os.getpid(),
        ctx.message.partition,
    )
    if p.hold_s > 0 and _claim("held", ctx.idempotency_key):
        await asyncio.sleep(p.hold_s)
    elif p.freeze and _claim("frozen", ctx.idempotency_key):
        _freeze.armed = True
    elif WORK_MS:
        await asyncio.sleep(WORK_MS / 1000)
    return p.n


# ---- the freeze trap: at the probe's transaction points (consumer/probe.py), test-only


class _FreezeTrap(Probe):
    def __init__(self) -> None:
        self.armed = False
        self.in_tx = 0

    async def point(self, name: str) -> None:
        if name == "before_transaction":
            if self.armed:
                self.armed = False
                # Wait until no other batch of this process holds a transaction open, then
                # stop with no await in between, so that none can begin one.
                while self.in_tx:  # noqa: ASYNC110  (a counter, polled for a few ms, once)
                    await asyncio.sleep(0.001)
                os.kill(os.getpid(), signal.SIGSTOP)
            self.in_tx += 1
        elif name == "after_transaction":
            self.in_tx -= 1


_freeze = _FreezeTrap()
if HOLD_DIR:  # a worker process of a trap test (never the pytest process importing Count)
    probe.install(_freeze)
