"""A set-based batch handler on a real Worker, Kafka, Redis and PostgreSQL: ledger rows.

The handler inserts the batch's ledger rows in ONE ``unnest`` statement and publishes with one
call, as the bench's batch app does. Each scenario counts the ledger rows per key afterwards:
exactly one per applied key, none for a rejected one (the handler leaves its rows out), none
left behind by a call that was rolled back (an exception, a Retry, a timeout, a crash), which is
what "outcomes stay exact" means for the effects a payments team cares about.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from pydantic import BaseModel

from consumer import App, BatchContext, Item, Outcome, Reject, Retry, Settings
from tests.conftest import app_settings
from tests.contract.drivers import RuntimeDriver

pytestmark = pytest.mark.integration


class Pay(BaseModel):
    id: str
    cents: int
    flag: str = ""  # "reject" | "retry_first" | "raise" | "hang" | ""


def pay(key: str, cents: int = 1, flag: str = "") -> dict[str, Any]:
    return {"id": key, "cents": cents, "flag": flag}


def ledger_app(group: str, topic: str, table: str, calls: Counter[str], s: Settings) -> App:
    app = App(group, settings=s)

    @app.batch_handler(topic, schema=Pay, key=lambda p: p.id, timeout_s=2)
    async def handle(batch: list[Item[Pay]], ctx: BatchContext) -> list[Any]:
        calls[f"<batch of {len(batch)}>"] += 1
        verdicts: list[Any] = []
        for it in batch:
            if it.payload.flag == "reject":
                verdicts.append(Reject("refused"))
            elif it.payload.flag == "retry_first" and it.attempt == 1:
                verdicts.append(Retry(reason="gateway busy"))
            else:
                verdicts.append({"cents": it.payload.cents, "attempt": it.attempt})
        # A rejected item's rows must not be written: the framework cannot take them back.
        rows = [it for it, v in zip(batch, verdicts, strict=True) if not isinstance(v, Reject)]
        await ctx.db.execute(
            f"INSERT INTO {table} (key, cents) SELECT * FROM unnest($1::text[], $2::bigint[])",
            [it.key for it in rows],
            [it.payload.cents for it in rows],
        )
        ctx.publish_many(f"{topic}-out", rows, lambda it: {"id": it.key}, key=lambda it: it.key)
        if len(batch) > 1 and any(it.payload.flag == "raise" for it in batch):
            raise RuntimeError("the batch fails after its insert")
        if len(batch) > 1 and any(it.payload.flag == "hang" for it in batch):
            await asyncio.Event().wait()  # only the timeout ends it, after the insert
        return verdicts

    return app


@pytest.fixture
async def ledger(
    settings: Settings, topics: Any, producer: AIOKafkaProducer, pg: asyncpg.Connection, unique: str
) -> AsyncIterator[tuple[RuntimeDriver, asyncpg.Connection, str]]:
    table = f"batch_ledger_{unique}"
    await pg.execute(f"CREATE TABLE {table} (key text NOT NULL, cents bigint NOT NULL)")
    topic = await topics("batchh", extra=("batchh-out",))
    s = app_settings(settings, lease_ms=1000, retry_backoff_ms=50, relay_enabled=False)
    calls: Counter[str] = Counter()
    group = f"batchh-{unique}"
    d = RuntimeDriver(
        ledger_app(group, topic, table, calls, s), s, producer, topic, f"{topic}-out", calls
    )
    await d.start()
    try:
        yield d, pg, table
    finally:
        await d.close()
        await pg.execute(f"DROP TABLE {table}")


async def rows(pg: asyncpg.Connection, table: str) -> dict[str, int]:
    got = await pg.fetch(f"SELECT key, count(*) AS n FROM {table} GROUP BY key")
    return {r["key"]: r["n"] for r in got}


async def test_applied_once_across_copies_resends_and_conflicts(ledger: Any) -> None:
    d, pg, table = ledger
    seen = await d.send_batch([pay("a"), pay("b", 2), pay("a"), pay("b", 5)])
    assert [s.outcome for s in seen] == [
        Outcome.APPLIED,
        Outcome.APPLIED,
        Outcome.DUPLICATE,
        Outcome.CONFLICT,
    ]
    again = await d.send_batch([pay("b", 2), pay("a"), pay("c", 3)])
    assert [s.outcome for s in again] == [Outcome.DUPLICATE, Outcome.DUPLICATE, Outcome.APPLIED]
    assert await rows(pg, table) == {"a": 1, "b": 1, "c": 1}
    assert d.calls["<batch of 2>"] == 1 and d.calls["<batch of 1>"] == 1
    assert len(await d.messages(f"{d.topic}-out")) == 3


async def test_reject_and_retry_per_item(ledger: Any) -> None:
    d, pg, table = ledger
    seen = await d.send_batch([pay("x"), pay("r", flag="reject"), pay("t", flag="retry_first")])
    assert [s.outcome for s in seen] == [Outcome.APPLIED, Outcome.REJECTED, Outcome.APPLIED]
    assert seen[2].result == {"cents": 1, "attempt": 2}  # nothing burned by the Retry
    assert await rows(pg, table) == {"x": 1, "t": 1}
    record = await d.inbox("r")
    assert record is not None and (record.status, record.reason) == ("rejected", "refused")


@pytest.mark.parametrize("flag", ["raise", "hang"])
async def test_a_failed_or_timed_out_call_leaves_no_rows_then_runs_per_message(
    ledger: Any, flag: str
) -> None:
    d, pg, table = ledger
    seen = await d.send_batch([pay("x"), pay("y", 2, flag=flag), pay("z", 3)])
    assert [s.outcome for s in seen] == [Outcome.APPLIED] * 3
    assert (d.calls["<batch of 3>"], d.calls["<batch of 1>"]) == (1, 3)
    assert await rows(pg, table) == {"x": 1, "y": 1, "z": 1}


@pytest.mark.parametrize("point", ["before_commit", "after_commit"])
async def test_a_crash_applies_once(ledger: Any, point: str) -> None:
    d, pg, table = ledger
    d.crash_next(point)
    seen = await d.send_batch([pay("a"), pay("b")])
    assert [s.crashed for s in seen] == [point] * 2
    again = await d.send_batch([pay("a"), pay("b")])
    assert [s.outcome for s in again] == [Outcome.DUPLICATE] * 2
    assert await rows(pg, table) == {"a": 1, "b": 1}
    assert d.calls["<batch of 2>"] == (2 if point == "before_commit" else 1)
