"""Messages whose batch could never commit, which would stall a partition forever.

Each test drives BatchProcessor directly on PostgreSQL (no Kafka: the records are built here)
and re-delivers from the retry position, as the worker would, a bounded number of times. A
message must reach an outcome within max_attempts; a batch that failed as a whole on every
redelivery would stall its partition forever (consumer/storable.py, runtime/poison.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgpack
import pytest

from consumer import App, Context
from consumer.message import Message
from consumer.runtime import poison
from consumer.runtime.batch import BatchProcessor
from consumer.runtime.outcomes import BatchResult, Outcome
from tests.integration.dedup_support import (
    Pay,
    direct_env,
    direct_processor,
    drive,
    inbox,
    outbox,
    record,
    stored_offset,
)

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 3


@pytest.fixture
async def env(settings, pg, unique) -> AsyncIterator[dict[str, Any]]:
    async with direct_env(settings, pg, unique, "poison", max_attempts=MAX_ATTEMPTS) as e:
        yield e


async def _drive(processor: BatchProcessor, msgs: list[Message]) -> list[BatchResult]:
    """Redeliver from the retry position, as the worker does, a bounded number of times."""
    return await drive(processor, msgs, MAX_ATTEMPTS + 3)


async def _assert_progress(pg: asyncpg.Connection, env: dict[str, Any], results, last: int):
    errors = [r.error for r in results if r.retry_offset is not None]
    assert await stored_offset(pg, env["group"], env["topic"], 0) == last + 1, errors[-1:]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
async def test_non_finite_float_in_result_does_not_stall_the_partition(env, pg, value):
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        return {"rate": value} if p.id == "bad" else {"ok": 1}

    topic = env["topic"]
    msgs = [record(topic, 0, {"id": "bad"}), record(topic, 1, {"id": "good"})]
    results = await _drive(direct_processor(app, env), msgs)
    await _assert_progress(pg, env, results, 1)


@pytest.mark.parametrize(
    ("headers", "publish"),
    [({"reply-to": b"replies\x00x"}, False), ({"traceparent": b"00-\x00-01"}, True)],
    ids=["reply_to", "traceparent_and_a_publish"],
)
async def test_header_with_nul_does_not_stall_the_partition(env, pg, headers, publish):
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        if publish:
            ctx.publish(env["topic"] + ".out", {"id": p.id})
        return {"ok": 1}

    topic = env["topic"]
    msgs = [record(topic, 0, {"id": "h"}, headers=headers), record(topic, 1, {"id": "good"})]
    results = await _drive(direct_processor(app, env), msgs)
    await _assert_progress(pg, env, results, 1)
    handled = [h.outcome for r in results for h in r.handled]
    assert Outcome.APPLIED in handled


@pytest.mark.parametrize("suffix", ["", ".dlq", ".conflicts"])
async def test_a_reply_to_a_topic_the_app_consumes_is_refused(env, pg, suffix):
    # The requester sets reply-to to the app's own input (or its dead-letter topic): the
    # reply would come back in as a new message (or a forged dead letter for replay).
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        return {"id": p.id, "ok": 1}

    topic = env["topic"]
    loop = (topic + suffix).encode()
    replies = f"{topic}-replies"
    msgs = [
        record(topic, 0, {"id": "loop"}, headers={"reply-to": loop}),
        record(topic, 1, {"id": "fine"}, headers={"reply-to": replies.encode()}),
    ]
    results = await _drive(direct_processor(app, env), msgs)
    await _assert_progress(pg, env, results, 1)
    assert [h.outcome for r in results for h in r.handled] == [Outcome.APPLIED] * 2
    assert await outbox(pg, topic + suffix) == []
    assert [msgpack.unpackb(r["value"]) for r in await outbox(pg, replies)] == [
        {"id": "fine", "ok": 1}
    ]


@pytest.mark.parametrize("how", ["result", "reject"])
async def test_lone_surrogate_in_a_hash_excluded_field_does_not_stall_the_partition(env, pg, how):
    # identify() refuses lone surrogates only in hashed fields; an excluded field passes and a
    # handler that echoes it (result, or a Reject reason) writes text PostgreSQL refuses.
    from consumer import Reject

    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id, hash_exclude={"sent_at"})
    async def handle(p: Pay, ctx: Context) -> Any:
        if how == "reject":
            raise Reject(f"bad sent_at {p.sent_at}")
        return {"echo": p.sent_at}

    topic = env["topic"]
    bad = Message(
        topic,
        0,
        0,
        None,
        b'{"id": "s", "sent_at": "\\ud800"}',
        (("content-type", b"application/json"),),
    )
    msgs = [bad, record(topic, 1, {"id": "good"})]
    results = await _drive(direct_processor(app, env), msgs)
    await _assert_progress(pg, env, results, 1)


@contextlib.asynccontextmanager
async def refusing(pg: asyncpg.Connection, topic: str, tag: str) -> AsyncIterator[None]:
    """PostgreSQL refuses outbox rows to ``topic`` for a data reason (SQLSTATE 22023)."""
    fn = f"refuse_{tag.replace('-', '_')}"
    await pg.execute(
        f"CREATE FUNCTION dedup.{fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"RAISE EXCEPTION 'value refused' USING ERRCODE = '22023'; END $$"
    )
    await pg.execute(
        f"CREATE TRIGGER {fn} BEFORE INSERT ON dedup.outbox FOR EACH ROW "
        f"WHEN (NEW.topic = '{topic}') EXECUTE FUNCTION dedup.{fn}()"
    )
    try:
        yield
    finally:
        await pg.execute(f"DROP TRIGGER {fn} ON dedup.outbox")
        await pg.execute(f"DROP FUNCTION dedup.{fn}()")


async def test_a_value_refused_at_a_shared_statement_is_isolated_and_dead_lettered(env, pg):
    """Behind the per-message checks: PostgreSQL refuses, for a data reason (SQLSTATE 22023
    raised by a trigger here), a row the whole batch inserts together. The records before the
    culprit commit, the culprit is dead-lettered as unstorable with nothing recorded, and the
    records after it apply: the partition does not stall."""
    topic = env["topic"]
    refused = f"refused-{env['group']}"
    async with refusing(pg, refused, env["group"]):
        app = App(env["group"], settings=env["settings"])
        runs: list[str] = []

        @app.handler(topic, schema=Pay, key=lambda p: p.id)
        async def handle(p: Pay, ctx: Context) -> Any:
            runs.append(p.id)
            ctx.publish(refused if p.id == "bad" else topic + ".out", {"id": p.id})
            return {"ok": p.id}

        msgs = [record(topic, i, {"id": pid}) for i, pid in enumerate(["a", "b", "bad", "c"])]
        results = await _drive(direct_processor(app, env), msgs)

    await _assert_progress(pg, env, results, 3)
    outcomes = {h.message.offset: h.outcome for r in results for h in r.handled}
    assert outcomes == {
        0: Outcome.APPLIED,
        1: Outcome.APPLIED,
        2: Outcome.FAILED,
        3: Outcome.APPLIED,
    }
    [bad] = [h for r in results for h in r.handled if h.outcome is Outcome.FAILED]
    assert bad.reason.startswith(f"unstorable ({MAX_ATTEMPTS}): ")
    assert "value refused" in bad.reason
    # a, b, c: in the first batch, then alone; bad: in the batch, then alone until given up.
    assert [runs.count(k) for k in ("a", "b", "c")] == [2, 2, 2]
    assert runs.count("bad") == MAX_ATTEMPTS + 1
    records = await inbox(pg, f"{env['group']}.handle")
    assert {k: r["status"] for k, r in records.items()} == {"a": "done", "b": "done", "c": "done"}
    [dead] = await outbox(pg, topic + ".dlq")
    assert (dead["headers"]["x-reason"], dead["headers"]["x-idempotency-key"]) == (
        "unstorable",
        "bad",
    )


async def test_records_refused_one_after_another_stall_instead_of_draining(env, pg):
    """When every record is refused (a database problem more likely than bad data), only
    MAX_IN_A_ROW are dead-lettered; then the partition waits instead of draining into the
    dead-letter topic."""
    topic = env["topic"]
    refused = f"refused-{env['group']}"
    async with refusing(pg, refused, env["group"]):
        app = App(env["group"], settings=env["settings"])

        @app.handler(topic, schema=Pay, key=lambda p: p.id)
        async def handle(p: Pay, ctx: Context) -> Any:
            ctx.publish(refused, {"id": p.id})
            return None

        msgs = [record(topic, i, {"id": f"k{i}"}) for i in range(poison.MAX_IN_A_ROW + 2)]
        rounds = (poison.MAX_IN_A_ROW + 2) * MAX_ATTEMPTS + 2
        results = await drive(direct_processor(app, env), msgs, rounds)

    assert len(results) == rounds  # still retrying at the end: stalled, not finished
    assert results[-1].retry_offset == poison.MAX_IN_A_ROW
    assert await stored_offset(pg, env["group"], topic, 0) == poison.MAX_IN_A_ROW
    dead = await outbox(pg, topic + ".dlq")
    assert [d["headers"]["x-reason"] for d in dead] == ["unstorable"] * poison.MAX_IN_A_ROW
    assert await inbox(pg, f"{env['group']}.handle") == {}
