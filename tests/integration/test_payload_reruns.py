"""A handler that runs again on one record sees the payload as it was decoded, whatever the
run before did to it.

Three ways a record's handler runs twice inside one delivery, each with a run that is thrown
away: a batch handler's call that raised, before the per-message runs
(consumer/runtime/batch_run.py); an optimistic batch rolled back and run again with
savepoints (runtime/batch.py); a batch refused at a statement it shares, run again record by
record (runtime/poison.py). A handler may change its payload model in place (append to a list
field, adjust an amount): the change must not reach the run that counts. Each handler returns
the payload it was given, as it was given, before changing it; the stored result is what the
run that counted saw. Real Kafka, Redis and PostgreSQL (the last two tests drive the
BatchProcessor on PostgreSQL directly, as tests/integration/test_poison.py does).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from pydantic import BaseModel

from consumer import App, BatchContext, Context, Item, Outcome, Reject, Settings
from tests.conftest import app_settings
from tests.contract.drivers import RuntimeDriver
from tests.integration.dedup_support import direct_env, direct_processor, drive, inbox, record
from tests.integration.test_poison import refusing

pytestmark = pytest.mark.integration


class Bag(BaseModel):
    id: str
    cents: int = 1
    tags: list[str] = []


def _spoil(p: Bag) -> dict[str, Any]:
    """What the run was given; then the payload is changed in place, as a handler may."""
    given = p.model_dump()
    p.cents += 100
    p.tags.append("spoiled")
    return given


def untouched(key: str) -> dict[str, Any]:
    return {"id": key, "cents": 1, "tags": []}


async def test_a_failed_batch_call_does_not_change_the_payloads_of_the_per_message_runs(
    settings: Settings, topics: Any, producer: AIOKafkaProducer, unique: str
) -> None:
    topic = await topics("bagb", partitions=1, extra=("bagb-out",))
    s = app_settings(settings, relay_enabled=False, retry_backoff_ms=50)
    app = App(f"g-{unique}", settings=s)
    calls: Counter[str] = Counter()

    @app.batch_handler(topic, schema=Bag, key=lambda p: p.id)
    async def handle(batch: list[Item[Bag]], ctx: BatchContext) -> list[Any]:
        calls[f"<batch of {len(batch)}>"] += 1
        given = [_spoil(it.payload) for it in batch]
        if len(batch) > 1:
            raise RuntimeError("the batch call fails after changing its payloads")
        return given

    d = RuntimeDriver(app, s, producer, topic, f"bagb-out-{unique}", calls)
    await d.start()
    try:
        seen = await d.send_batch([{"id": k} for k in ("a", "b", "c")])
    finally:
        await d.close()
    assert (calls["<batch of 3>"], calls["<batch of 1>"]) == (1, 3)
    assert [x.outcome for x in seen] == [Outcome.APPLIED] * 3
    assert [x.result for x in seen] == [untouched(k) for k in ("a", "b", "c")]


@pytest.fixture
async def direct(settings, pg, unique) -> AsyncIterator[dict[str, Any]]:
    async with direct_env(settings, pg, unique, "bag", max_attempts=3, optimistic=True) as e:
        yield e


async def test_an_optimistic_batch_run_again_gives_its_handlers_the_decoded_payloads(
    direct: dict[str, Any], pg: asyncpg.Connection
) -> None:
    """``a`` succeeds in the optimistic run, ``reject`` ends it: the batch runs again with
    savepoints, and ``a``'s second run (the one kept) gets ``a`` as it was sent."""
    app = App(direct["group"], settings=direct["settings"])

    @app.handler(direct["topic"], schema=Bag, key=lambda p: p.id)
    async def handle(p: Bag, ctx: Context) -> dict[str, Any]:
        given = _spoil(p)
        await ctx.db.execute("SELECT 1")  # a statement: a Reject cannot be undone without one
        if p.id == "reject":
            raise Reject("no")
        return given

    processor = direct_processor(app, direct)
    msgs = [record(direct["topic"], i, {"id": k}) for i, k in enumerate(["a", "reject", "b"])]
    result = await processor.process(msgs)
    assert processor.fallbacks == 1
    outcomes = [h.outcome for h in result.handled]
    assert outcomes == [Outcome.APPLIED, Outcome.REJECTED, Outcome.APPLIED]
    records = await inbox(pg, f"{direct['group']}.handle")
    assert records["a"]["result"] == untouched("a")
    assert records["b"]["result"] == untouched("b")


async def test_a_batch_run_again_record_by_record_gives_its_handlers_the_decoded_payloads(
    direct: dict[str, Any], pg: asyncpg.Connection
) -> None:
    """The batch is refused at its shared outbox statement (``bad``'s row, SQLSTATE 22023 by
    a trigger): each record runs again alone, ``a`` with ``a`` as it was sent."""
    topic, group = direct["topic"], direct["group"]
    refused = f"refused-{group}"
    async with refusing(pg, refused, group):
        s = direct["settings"].model_copy(update={"optimistic": False})
        app = App(group, settings=s)

        @app.handler(topic, schema=Bag, key=lambda p: p.id)
        async def handle(p: Bag, ctx: Context) -> dict[str, Any]:
            given = _spoil(p)
            ctx.publish(refused if p.id == "bad" else topic + ".out", {"id": p.id})
            return given

        processor = direct_processor(app, {**direct, "settings": s})
        msgs = [record(topic, i, {"id": k}) for i, k in enumerate(["a", "bad", "b"])]
        await drive(processor, msgs, 6)
    records = await inbox(pg, f"{group}.handle")
    assert {k: r["status"] for k, r in records.items()} == {"a": "done", "b": "done"}
    assert records["a"]["result"] == untouched("a")
    assert records["b"]["result"] == untouched("b")
