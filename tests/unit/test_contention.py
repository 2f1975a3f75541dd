"""Lock contention inside PostgreSQL is retried without using up the message's attempts.

A deadlock or serialization failure says nothing about the message: a payment must not be
dead-lettered as ``attempts_exhausted`` because two batches touched the same rows.
"""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

from consumer import App, Context, Outcome, Settings, TransientError
from consumer.testing import TestApp

pytestmark = pytest.mark.unit


class Pay(BaseModel):
    id: str


class DeadlockDetected(Exception):
    """Shaped like asyncpg's error: what the runtime looks at is ``sqlstate``."""

    sqlstate = "40P01"


def _app(failures: list[BaseException]) -> App:
    app = App("contention", settings=Settings(max_attempts=2, retry_backoff_ms=0))

    @app.handler("pay", schema=Pay, key=lambda p: p.id)
    async def pay(p: Pay, ctx: Context) -> str:
        if failures:
            raise failures.pop(0)
        return "paid"

    return app


async def test_deadlocks_beyond_max_attempts_still_apply() -> None:
    failures: list[BaseException] = [DeadlockDetected("deadlock") for _ in range(5)]
    async with TestApp(_app(failures)) as t:
        sent = await t.send("pay", {"id": "p1"})
    assert failures == []
    assert sent.outcome is Outcome.APPLIED
    assert sent.result == "paid"


async def test_other_transient_errors_still_count() -> None:
    failures: list[BaseException] = [TransientError("timeout") for _ in range(5)]
    async with TestApp(_app(failures)) as t:
        sent = await t.send("pay", {"id": "p1"})
    assert sent.outcome is Outcome.FAILED
    assert sent.reason.startswith("attempts_exhausted (2)")


async def test_a_handler_raising_cancelled_error_itself_fails_only_its_message() -> None:
    # Not a stop request (the task is not being cancelled): the message's error, retried and
    # dead-lettered like any unknown exception, and the runtime keeps going.
    failures: list[BaseException] = [asyncio.CancelledError() for _ in range(2)]
    async with TestApp(_app(failures)) as t:
        sent = await t.send("pay", {"id": "p1"})
        after = await t.send("pay", {"id": "p2"})
    assert sent.outcome is Outcome.FAILED
    assert "the handler raised CancelledError" in sent.reason
    assert after.outcome is Outcome.APPLIED
