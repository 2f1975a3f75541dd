"""Every row of DESIGN.md's outcome table, and every bad input, against real services.

Each test runs one Worker (real Kafka, Redis, PostgreSQL) on its own topic, group and effects
table, and asserts what was committed: effect rows, inbox records, outbox rows, positions.
The effects tables have no unique constraint, so a second effect would show as a second row.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgpack
import pytest
from aiokafka import AIOKafkaConsumer

from consumer import App, Context, Reject, Retry, Settings
from consumer.constants import done_key, lease_key
from consumer.db.pool import create_pool
from consumer.dedup.hashing import HASH_VERSION, marker_digest
from consumer.dedup.identity import identify
from consumer.dedup.leases import RedisLeases
from consumer.message import Message
from consumer.runtime.batch import BatchProcessor, pg_transaction
from consumer.runtime.outcomes import Outcome
from tests.conftest import app_settings, eventually, running
from tests.integration.dedup_support import (
    Pay,
    Spy,
    cleanup,
    db_epoch,
    effects,
    inbox,
    outbox,
    redis_keys,
    send,
    stored_offset,
    wait_offset,
)

pytestmark = pytest.mark.integration

APPLIED, DUPLICATE, CONFLICT = Outcome.APPLIED, Outcome.DUPLICATE, Outcome.CONFLICT
REJECTED, INVALID, FAILED = Outcome.REJECTED, Outcome.INVALID, Outcome.FAILED


@dataclass
class Env:
    topic: str
    table: str
    group: str
    settings: Settings
    pg: asyncpg.Connection

    def app(self, **overrides: Any) -> App:
        return App(self.group, settings=self.settings.model_copy(update=overrides))

    def ns(self, fn: str = "handle") -> str:
        return f"{self.group}.{fn}"

    async def effect(self, ctx: Context, key: str, note: str = "") -> None:
        await ctx.db.execute(f"INSERT INTO {self.table} (k, v) VALUES ($1, $2)", key, note)


@pytest.fixture
async def env(settings, topics, pg, unique) -> AsyncIterator[Env]:
    topic = await topics("outcomes", extra=("replies",))
    table = f"eff_{unique}"
    await pg.execute(f"CREATE TABLE {table} (k text, v text)")
    s = app_settings(
        settings,
        relay_enabled=False,
        retry_backoff_ms=20,
        retry_backoff_max_ms=200,
        lease_wait_ms=300,
        max_attempts=3,
    )
    try:
        yield Env(topic, table, f"g-{unique}", s, pg)
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {table}")
        await cleanup(pg, unique, settings.redis_url)


# ---------------------------------------------------------------- no record: run the handler


async def test_new_key_runs_once_and_commits_record_effects_outbox_and_offset(env, producer):
    app = env.app()

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id, hash_exclude={"sent_at"})
    async def handle(p: Pay, ctx: Context) -> dict[str, Any]:
        await env.effect(ctx, p.id)
        ctx.publish(env.topic + ".dlq", {"paid": p.id}, key=p.id)  # any topic: a published row
        return {"paid": p.id, "cents": p.cents, "attempt": ctx.attempt, "ik": ctx.idempotency_key}

    async with running(app) as worker:
        spy = Spy(worker)
        off = await send(producer, env.topic, {"id": "k1", "cents": 5})
        await wait_offset(env.pg, env.group, env.topic, 0, off + 1)

    assert spy.at(0, off) == [APPLIED]
    assert await effects(env.pg, env.table) == ["k1"]
    rec = (await inbox(env.pg, env.ns()))["k1"]
    assert rec["status"] == "done"
    assert rec["hash_alg"] == "blake2b-128"
    assert rec["result"] == {"paid": "k1", "cents": 5, "attempt": 1, "ik": "k1"}
    assert (rec["topic"], rec["partition"], rec["offset"]) == (env.topic, 0, off)
    [row] = await outbox(env.pg, env.topic + ".dlq")
    assert msgpack.unpackb(row["value"]) == {"paid": "k1"}
    assert row["headers"]["idempotency-key"] == f"{env.ns()}:k1:0"
    assert row["headers"]["x-source"] == f"{env.topic}/0/{off}"


# ---------------------------------------------------------------- done with hash h: duplicate


async def test_duplicate_is_skipped_across_encodings_partitions_and_excluded_fields(env, producer):
    app = env.app()
    calls: list[str] = []

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id, hash_exclude={"sent_at"})
    async def handle(p: Pay, ctx: Context) -> str:
        calls.append(p.id)
        await env.effect(ctx, p.id)
        return "ok"

    async with running(app) as worker:
        spy = Spy(worker)
        first = await send(producer, env.topic, {"id": "k", "cents": 7, "sent_at": "t1"})
        await wait_offset(env.pg, env.group, env.topic, 0, first + 1)
        # Same logical payload: JSON instead of msgpack, fields reordered, another sent_at,
        # another partition, and once more on the same partition.
        o1 = await send(
            producer, env.topic, {"sent_at": "t2", "cents": 7, "id": "k"}, as_json=True, partition=1
        )
        o0 = await send(producer, env.topic, {"id": "k", "cents": 7, "sent_at": "t3"})
        await wait_offset(env.pg, env.group, env.topic, 1, o1 + 1)
        await wait_offset(env.pg, env.group, env.topic, 0, o0 + 1)

    assert spy.at(0, first) == [APPLIED]
    assert spy.at(1, o1) == [DUPLICATE]
    assert spy.at(0, o0) == [DUPLICATE]
    assert calls == ["k"]
    assert await effects(env.pg, env.table) == ["k"]


async def test_duplicate_answered_from_postgres_when_redis_forgot(env, producer, settings):
    app = env.app()

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> str:
        await env.effect(ctx, p.id)
        return "ok"

    redis = RedisLeases(settings.redis_url)
    try:
        async with running(app) as worker:
            spy = Spy(worker)
            a = await send(producer, env.topic, {"id": "k"})
            await wait_offset(env.pg, env.group, env.topic, 0, a + 1)
            # The done marker is gone (eviction, restart): the inbox still answers.
            deleted = await redis.redis.delete(*redis_keys(env.ns(), ["k"], await db_epoch(env.pg)))
            assert deleted == 1  # the done marker (the lease was released)
            b = await send(producer, env.topic, {"id": "k"})
            await wait_offset(env.pg, env.group, env.topic, 0, b + 1)
    finally:
        await redis.close()
    assert spy.at(0, b) == [DUPLICATE]
    assert await effects(env.pg, env.table) == ["k"]


async def test_duplicate_republishes_the_stored_reply(env, producer):
    app = env.app()
    replies = f"replies-{env.group[2:]}"

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> dict[str, int]:
        await env.effect(ctx, p.id)
        return {"cents": p.cents * 10}

    async with running(app) as worker:
        spy = Spy(worker)
        a = await send(
            producer, env.topic, {"id": "r", "cents": 3}, headers={"reply-to": replies.encode()}
        )
        b = await send(
            producer, env.topic, {"id": "r", "cents": 3}, headers={"reply-to": replies.encode()}
        )
        c = await send(producer, env.topic, {"id": "r", "cents": 3})  # no reply asked
        await wait_offset(env.pg, env.group, env.topic, 0, c + 1)

    assert [spy.at(0, o) for o in (a, b, c)] == [[APPLIED], [DUPLICATE], [DUPLICATE]]
    rows = await outbox(env.pg, replies)
    assert len(rows) == 2
    assert [msgpack.unpackb(r["value"]) for r in rows] == [{"cents": 30}, {"cents": 30}]
    # Same idempotency key on both: a requester that dedups sees one answer.
    assert rows[0]["idempotency_key"] == rows[1]["idempotency_key"] == f"reply:{env.ns()}:r"
    assert [r["headers"]["x-outcome"] for r in rows] == ["done", "done"]
    assert await effects(env.pg, env.table) == ["r"]


# ---------------------------------------------------------------- different hash: conflict


async def test_conflict_is_never_applied_never_answered_and_routed_with_both_hashes(env, producer):
    app = env.app()
    replies = f"replies-{env.group[2:]}"
    calls: list[int] = []

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> dict[str, int]:
        calls.append(p.cents)
        await env.effect(ctx, p.id, str(p.cents))
        if p.cents < 0:
            raise Reject("negative")
        return {"cents": p.cents}

    handler = app.handler_for(env.topic)
    assert handler is not None

    def digest(payload: dict[str, Any]) -> str:
        return identify(handler, Message(env.topic, 0, 0, None, msgpack.packb(payload))).hash

    async with running(app) as worker:
        spy = Spy(worker)
        a = await send(producer, env.topic, {"id": "c", "cents": 1})
        d = await send(producer, env.topic, {"id": "neg", "cents": -1})
        await wait_offset(env.pg, env.group, env.topic, 0, d + 1)  # first copies first
        b = await send(
            producer, env.topic, {"id": "c", "cents": 2}, headers={"reply-to": replies.encode()}
        )
        # Also on another partition, and against a rejected record.
        c = await send(producer, env.topic, {"id": "c", "cents": 3}, partition=2)
        e = await send(producer, env.topic, {"id": "neg", "cents": -2})
        await wait_offset(env.pg, env.group, env.topic, 0, e + 1)
        await wait_offset(env.pg, env.group, env.topic, 2, c + 1)

    assert spy.at(0, a) == [APPLIED]
    assert spy.at(0, b) == [CONFLICT]
    assert spy.at(2, c) == [CONFLICT]
    assert spy.at(0, d) == [REJECTED]
    assert spy.at(0, e) == [CONFLICT]
    assert calls == [1, -1]
    rows = {r[0]: r[1] for r in await env.pg.fetch(f"SELECT k, v FROM {env.table}")}
    assert rows == {"c": "1"}  # the Reject rolled its effect back
    assert await outbox(env.pg, replies) == []  # never answered with the old result
    conflicts = await outbox(env.pg, env.topic + ".conflicts")
    # One conflict row per conflicting copy, with its own hash, the stored one and its bytes.
    got = sorted(
        (
            r["headers"]["x-idempotency-key"],
            r["headers"]["x-payload-hash"],
            r["headers"]["x-stored-hash"],
            msgpack.unpackb(r["value"])["cents"],
        )
        for r in conflicts
    )
    assert got == sorted(
        [
            ("c", digest({"id": "c", "cents": 2}), digest({"id": "c", "cents": 1}), 2),
            ("c", digest({"id": "c", "cents": 3}), digest({"id": "c", "cents": 1}), 3),
            ("neg", digest({"id": "neg", "cents": -2}), digest({"id": "neg", "cents": -1}), -2),
        ]
    )
    assert all(r["headers"]["x-reason"] == "conflict" for r in conflicts)
    assert all(r["headers"]["x-namespace"] == env.ns() for r in conflicts)
    records = await inbox(env.pg, env.ns())
    assert records["c"]["payload_hash"] == digest({"id": "c", "cents": 1})
    assert records["c"]["result"] == {"cents": 1}


# ---------------------------------------------------------------- rejected with hash h


async def test_rejected_and_its_duplicate_get_the_same_answer(env, producer):
    app = env.app()
    replies = f"replies-{env.group[2:]}"
    calls: list[str] = []

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> str:
        calls.append(p.id)
        await env.effect(ctx, p.id)
        ctx.publish(env.topic + ".conflicts", {"never": "sent"})
        raise Reject("amount must be positive")

    async with running(app) as worker:
        spy = Spy(worker)
        hdr = {"reply-to": replies.encode()}
        a = await send(producer, env.topic, {"id": "x", "cents": 0}, headers=hdr)
        await wait_offset(env.pg, env.group, env.topic, 0, a + 1)
        b = await send(producer, env.topic, {"id": "x", "cents": 0}, headers=hdr, partition=1)
        await wait_offset(env.pg, env.group, env.topic, 1, b + 1)

    assert spy.at(0, a) == [REJECTED]
    assert spy.at(1, b) == [DUPLICATE]
    assert calls == ["x"]  # no retry of a definite failure
    assert await effects(env.pg, env.table) == []  # rolled back to the savepoint
    assert await outbox(env.pg, env.topic + ".conflicts") == []  # its publish too
    rec = (await inbox(env.pg, env.ns()))["x"]
    assert (rec["status"], rec["reason"], rec["result"]) == (
        "rejected",
        "amount must be positive",
        None,
    )
    [dlq] = await outbox(env.pg, env.topic + ".dlq")  # dead-lettered once, not per copy
    assert dlq["headers"]["x-reason"] == "rejected"
    assert dlq["headers"]["x-detail"] == "amount must be positive"
    answers = await outbox(env.pg, replies)
    assert [msgpack.unpackb(r["value"]) for r in answers] == [
        {"rejected": "amount must be positive"}
    ] * 2
    assert {r["headers"]["x-outcome"] for r in answers} == {"rejected"}


# ---------------------------------------------------------------- lease held elsewhere


async def _epoch(pg: asyncpg.Connection) -> str:
    return str(await pg.fetchval("SELECT value FROM dedup.meta WHERE name = 'epoch'") or "")


async def test_lease_held_elsewhere_waits_then_sees_the_other_holders_result(
    env, producer, settings
):
    app = env.app()
    calls: list[str] = []

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> str:
        calls.append(p.id)
        await env.effect(ctx, p.id)
        return "mine"

    handler = app.handler_for(env.topic)
    assert handler is not None
    payload = {"id": "held", "cents": 4}
    digest = identify(handler, Message(env.topic, 0, 0, None, msgpack.packb(payload))).hash
    redis = RedisLeases(settings.redis_url)
    lease = lease_key(env.ns(), "held")
    try:
        # Another worker holds the key.
        assert await redis.redis.set(lease, "other-worker-token", px=60_000, nx=True)
        async with running(app) as worker:
            spy = Spy(worker)
            off = await send(producer, env.topic, payload)

            async def waited() -> bool:
                return any("lease" in e for e in spy.retries)

            await eventually(waited)
            # While the other holder runs, nothing is recorded here and the position holds.
            assert calls == []
            assert await inbox(env.pg, env.ns()) == {}
            assert await stored_offset(env.pg, env.group, env.topic, 0) <= off
            # The other holder commits its record, writes its done marker, releases its lease.
            await env.pg.execute(
                """INSERT INTO dedup.inbox (namespace, key, payload_hash, hash_alg, hash_version,
                       status, result, topic, partition, "offset", completed_at)
                   VALUES ($1, 'held', $2, 'blake2b-128', 2, 'done', '"theirs"', $3, 0, 0,
                           now())""",
                env.ns(),
                digest,
                env.topic,
            )
            await redis.redis.set(
                done_key(env.ns(), "held", await _epoch(env.pg)),
                f"done:{marker_digest(digest, HASH_VERSION)}",
                ex=60,
            )
            await redis.redis.delete(lease)
            await wait_offset(env.pg, env.group, env.topic, 0, off + 1)
    finally:
        await redis.close()
    assert spy.at(0, off) == [DUPLICATE]
    assert calls == []
    assert await effects(env.pg, env.table) == []  # the other holder's effect, not ours


async def test_lease_holder_that_died_after_commit_is_caught_by_the_inbox(env, producer, settings):
    # The holder committed, then died before writing its done marker and releasing its lease.
    app = env.app()
    calls: list[str] = []

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> str:
        calls.append(p.id)
        return "mine"

    handler = app.handler_for(env.topic)
    assert handler is not None
    payload = {"id": "dead", "cents": 4}
    digest = identify(handler, Message(env.topic, 0, 0, None, msgpack.packb(payload))).hash
    redis = RedisLeases(settings.redis_url)
    try:
        # Its lease outlives the test: only the inbox can tell that the key is done.
        await redis.redis.set(lease_key(env.ns(), "dead"), "dead-worker", px=120_000)
        await env.pg.execute(
            """INSERT INTO dedup.inbox (namespace, key, payload_hash, hash_alg, hash_version,
                   status, result, topic, partition, "offset", completed_at)
               VALUES ($1, 'dead', $2, 'blake2b-128', 2, 'done', '"theirs"', $3, 0, 0, now())""",
            env.ns(),
            digest,
            env.topic,
        )
        async with running(app) as worker:
            spy = Spy(worker)
            off = await send(producer, env.topic, payload)
            await wait_offset(env.pg, env.group, env.topic, 0, off + 1)
    finally:
        await redis.close()
    assert spy.at(0, off) == [DUPLICATE]
    assert calls == []


# ---------------------------------------------------------------- failures


async def test_retryable_failure_records_nothing_then_applies(env, producer, settings):
    app = env.app(max_attempts=5)
    seen: list[tuple[int, Any]] = []

    class Flaky(Exception):
        pass

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id, retry_on=(Flaky,))
    async def handle(p: Pay, ctx: Context) -> str:
        # What another connection sees while this attempt runs: a committed record would be
        # a key burned by an earlier, failed attempt.
        other = await asyncpg.connect(settings.postgres_dsn)
        try:
            committed = await other.fetchval(
                "SELECT status FROM dedup.inbox WHERE namespace=$1 AND key=$2", ctx.namespace, p.id
            )
        finally:
            await other.close()
        seen.append((ctx.attempt, committed))
        await env.effect(ctx, p.id)
        if ctx.attempt == 1:
            raise ConnectionError("gateway unreachable")
        if ctx.attempt == 2:
            raise Flaky("declared retryable")
        if ctx.attempt == 3:
            raise Retry(0.01, "asked to retry")
        return "done at last"

    async with running(app) as worker:
        spy = Spy(worker)
        off = await send(producer, env.topic, {"id": "f"})
        await wait_offset(env.pg, env.group, env.topic, 0, off + 1)

    assert seen == [(1, None), (2, None), (3, None), (4, None)]
    assert spy.at(0, off) == [APPLIED]
    assert len(spy.retries) == 3
    assert await effects(env.pg, env.table) == ["f"]  # three rolled back, one committed
    rec = (await inbox(env.pg, env.ns()))["f"]
    assert (rec["status"], rec["result"]) == ("done", "done at last")
    assert await outbox(env.pg, env.topic + ".dlq") == []


async def test_attempts_exhausted_is_dead_lettered_without_burning_the_key(env, producer):
    """Transient failures past max_attempts: a dead letter, no record; a later copy runs again."""
    app = env.app()
    calls: list[tuple[str, int]] = []

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id, max_attempts=2)
    async def handle(p: Pay, ctx: Context) -> str:
        calls.append((p.id, ctx.attempt))
        await env.effect(ctx, p.id)
        if len(calls) <= 2:
            raise TimeoutError("upstream timed out")
        return "applied at last"

    async with running(app) as worker:
        spy = Spy(worker)
        off = await send(producer, env.topic, {"id": "t"})
        await wait_offset(env.pg, env.group, env.topic, 0, off + 1)
        assert await inbox(env.pg, env.ns()) == {}  # nothing recorded: the key is free
        [dlq] = await outbox(env.pg, env.topic + ".dlq")
        assert dlq["headers"]["x-reason"] == "failed"
        assert dlq["headers"]["x-detail"].startswith("attempts_exhausted (2): TimeoutError")
        # The dependency is back: a copy (say, the dead letter replayed) applies once.
        replay = await send(producer, env.topic, {"id": "t"})
        dup = await send(producer, env.topic, {"id": "t"})
        await wait_offset(env.pg, env.group, env.topic, 0, dup + 1)

    assert calls == [("t", 1), ("t", 2), ("t", 1)]
    assert spy.at(0, off) == [FAILED]
    assert spy.at(0, replay) == [APPLIED]
    assert spy.at(0, dup) == [DUPLICATE]
    assert await effects(env.pg, env.table) == ["t"]
    rec = (await inbox(env.pg, env.ns()))["t"]
    assert (rec["status"], rec["result"]) == ("done", "applied at last")


@pytest.mark.parametrize(("on_error", "expected_calls"), [("reject", 1), ("retry", 3)])
async def test_unknown_exceptions_follow_on_error(env, producer, on_error, expected_calls):
    app = env.app()
    calls: list[int] = []

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id, on_error=on_error)
    async def handle(p: Pay, ctx: Context) -> str:
        calls.append(ctx.attempt)
        raise ValueError("a bug")

    async with running(app) as worker:
        spy = Spy(worker)
        off = await send(producer, env.topic, {"id": "u"})
        await wait_offset(env.pg, env.group, env.topic, 0, off + 1)

    assert len(calls) == expected_calls  # settings max_attempts=3
    [dlq] = await outbox(env.pg, env.topic + ".dlq")
    assert "ValueError: a bug" in dlq["headers"]["x-detail"]
    if on_error == "reject":  # definite: recorded
        assert spy.at(0, off) == [REJECTED]
        assert (await inbox(env.pg, env.ns()))["u"]["reason"].startswith("error:")
    else:  # treated as transient: dead-lettered after the attempts, nothing recorded
        assert spy.at(0, off) == [FAILED]
        assert dlq["headers"]["x-detail"].startswith("attempts_exhausted (3)")
        assert await inbox(env.pg, env.ns()) == {}


async def test_handler_timeout_is_indefinite_then_bounded(env, producer):
    app = env.app()
    calls: list[int] = []

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id, timeout_s=0.2, max_attempts=2)
    async def handle(p: Pay, ctx: Context) -> str:
        calls.append(ctx.attempt)
        await env.effect(ctx, p.id)
        if p.cents == 1:
            await ctx.db.execute("SELECT pg_sleep(10)")  # cancelled mid-query
        return "quick"

    async with running(app) as worker:
        spy = Spy(worker)
        slow = await send(producer, env.topic, {"id": "slow", "cents": 1})
        quick = await send(producer, env.topic, {"id": "quick", "cents": 2})
        await wait_offset(env.pg, env.group, env.topic, 0, quick + 1)

    assert spy.at(0, slow) == [FAILED]
    assert spy.at(0, quick) == [APPLIED]  # the connection is usable after the cancel
    assert calls == [1, 2, 1]
    assert await effects(env.pg, env.table) == ["quick"]
    assert "slow" not in await inbox(env.pg, env.ns())
    [dlq] = await outbox(env.pg, env.topic + ".dlq")
    assert "TimeoutError" in dlq["headers"]["x-detail"]


async def test_sync_handler_runs_in_a_thread(env, producer):
    app = env.app()
    threads: list[bool] = []

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id)
    def handle(p: Pay, ctx: Context) -> dict[str, int]:
        try:
            asyncio.get_running_loop()
            threads.append(False)
        except RuntimeError:
            threads.append(True)  # no loop here: a worker thread
        return {"cents": p.cents}

    async with running(app) as worker:
        spy = Spy(worker)
        off = await send(producer, env.topic, {"id": "s", "cents": 9})
        await wait_offset(env.pg, env.group, env.topic, 0, off + 1)

    assert threads == [True]
    assert spy.at(0, off) == [APPLIED]
    assert (await inbox(env.pg, env.ns()))["s"]["result"] == {"cents": 9}


# ---------------------------------------------------------------- bad input


BAD_INPUTS: list[tuple[str, dict[str, Any]]] = [
    ("missing_key", {"payload": {"cents": 1}}),
    ("missing_key", {"payload": {"cents": 1}, "headers": {"idempotency-key": b""}}),
    ("bad_key", {"payload": {"cents": 1}, "headers": {"idempotency-key": b"k" * 257}}),
    ("bad_key", {"payload": {"cents": 1}, "headers": {"idempotency-key": b"\xff\xfe"}}),
    ("undecodable", {"value": b"\xc1", "headers": {"idempotency-key": b"k-bad"}}),
    (
        "undecodable",
        {"value": b"{nope", "headers": {"idempotency-key": b"k-bad", "content-type": b"json"}},
    ),
    (
        "invalid_schema",
        {"payload": {"cents": "lots", "id": "x"}, "headers": {"idempotency-key": b"k-bad"}},
    ),
]


async def test_bad_inputs_are_dead_lettered_and_record_nothing(env, producer):
    app = env.app()

    class Body(Pay):
        id: str = "x"

    @app.handler(env.topic, schema=Body)  # key from the idempotency-key header
    async def handle(p: Body, ctx: Context) -> str:
        await env.effect(ctx, ctx.idempotency_key)
        return "ok"

    async with running(app) as worker:
        spy = Spy(worker)
        offsets = []
        for _, kwargs in BAD_INPUTS:
            offsets.append(await send(producer, env.topic, **kwargs))
        # The corrected message under the key the invalid ones carried.
        fixed = await send(producer, env.topic, {"cents": 1}, headers={"idempotency-key": b"k-bad"})
        await wait_offset(env.pg, env.group, env.topic, 0, fixed + 1)

    assert [spy.at(0, o) for o in offsets] == [[INVALID]] * len(BAD_INPUTS)
    assert spy.at(0, fixed) == [APPLIED]
    assert await effects(env.pg, env.table) == ["k-bad"]
    assert list(await inbox(env.pg, env.ns())) == ["k-bad"]
    dlq = await outbox(env.pg, env.topic + ".dlq")
    assert [r["headers"]["x-reason"] for r in dlq] == [reason for reason, _ in BAD_INPUTS]
    assert [r["headers"]["x-source"] for r in dlq] == [f"{env.topic}/0/{o}" for o in offsets]
    assert dlq[4]["value"] == b"\xc1"


async def test_dead_letters_reach_kafka_with_original_bytes_and_reason_headers(
    env, producer, settings
):
    app = env.app(relay_enabled=True, relay_poll_ms=50)

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> str:
        raise Reject(f"no account {p.id}")

    rejected_value = msgpack.packb({"id": "acct-9", "cents": 1})
    dlq_consumer = AIOKafkaConsumer(
        env.topic + ".dlq",
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await dlq_consumer.start()
    try:
        async with running(app):
            bad_off = await send(
                producer, env.topic, value=b"\x00garbage\xff", key=b"rk", headers={"trace": b"t1"}
            )
            rej_off = await send(producer, env.topic, value=rejected_value, key=b"rk2")
            got = []

            async def two() -> bool:
                batch = await dlq_consumer.getmany(timeout_ms=100)
                got.extend(r for recs in batch.values() for r in recs)
                return len(got) >= 2

            await eventually(two, timeout_s=60)
    finally:
        await dlq_consumer.stop()

    by_value = {r.value: r for r in got}
    bad = by_value[b"\x00garbage\xff"]
    assert bad.key == b"rk"
    hb = {k: v.decode() for k, v in bad.headers}
    assert hb["x-reason"] == "undecodable"
    assert hb["trace"] == "t1"
    assert hb["x-source"] == f"{env.topic}/0/{bad_off}"
    rej = by_value[rejected_value]
    hr = {k: v.decode() for k, v in rej.headers}
    assert (hr["x-reason"], hr["x-detail"]) == ("rejected", "no account acct-9")
    assert (hr["x-namespace"], hr["x-idempotency-key"]) == (env.ns(), "acct-9")
    assert hr["idempotency-key"] == f"dlq:{env.topic}/0/{rej_off}"


async def test_unstorable_result_is_the_handlers_error_not_a_stuck_partition(env, producer):
    # A result json cannot encode used to fail the whole batch at commit time, forever. Now
    # it is checked in the savepoint: dead-lettered at once as unstorable, whatever on_error
    # says, and nothing recorded (a fixed handler and a replay apply it).
    app = env.app()

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id, on_error="reject")
    async def handle(p: Pay, ctx: Context) -> Any:
        await env.effect(ctx, p.id)
        return {"raw": object()} if p.cents == 1 else {"s": "nul\x00inside"}

    async with running(app) as worker:
        spy = Spy(worker)
        a = await send(producer, env.topic, {"id": "a", "cents": 1})
        b = await send(producer, env.topic, {"id": "b", "cents": 2})
        c = await send(producer, env.topic, {"id": "k\x00"}, headers={"tenant": b"t\x00"})
        await wait_offset(env.pg, env.group, env.topic, 0, c + 1)

    assert [spy.at(0, o) for o in (a, b, c)] == [[FAILED], [FAILED], [INVALID]]
    assert await effects(env.pg, env.table) == []
    assert await inbox(env.pg, env.ns()) == {}
    dead = await outbox(env.pg, env.topic + ".dlq")
    assert [d["headers"]["x-reason"] for d in dead] == ["unstorable", "unstorable", "bad_key"]


# ---------------------------------------------------------------- in-process coalescing


class _RecordingLeases(RedisLeases):
    """Real Redis leases that remember every acquisition answer."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.answers: list[tuple[str, str]] = []

    async def acquire(self, idents, token, ttl_ms):  # type: ignore[no-untyped-def]
        out = await super().acquire(idents, token, ttl_ms)
        self.answers += [(key, r.state) for (_, key), r in zip(idents, out, strict=True)]
        return out


async def test_copies_in_one_process_await_the_first_instead_of_contending(env, settings):
    # Two partitions' batches in one worker carry the same key. The second waits on the first
    # in memory: it never even asks Redis while the first runs, then answers as a duplicate.
    app = env.app()
    started, release = asyncio.Event(), asyncio.Event()
    calls: list[int] = []

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> str:
        calls.append(ctx.message.partition)
        started.set()
        await release.wait()
        await env.effect(ctx, p.id)
        return "once"

    pool = await create_pool(settings.postgres_dsn, max_size=4)
    leases = _RecordingLeases(settings.redis_url)
    processor = BatchProcessor(
        app, env.settings, leases, "tok-" + env.group, lambda: pg_transaction(pool)
    )
    body = msgpack.packb({"id": "co", "cents": 2})
    try:
        first = asyncio.create_task(processor.process([Message(env.topic, 0, 0, None, body)]))
        await started.wait()
        second = asyncio.create_task(processor.process([Message(env.topic, 1, 0, None, body)]))
        inflight = processor.inflight[(env.ns(), "co")]

        async def parked() -> bool:
            # The second batch is waiting on the first's in-process future.
            return bool(inflight._callbacks)

        await eventually(parked, timeout_s=10, every_s=0.01)
        assert leases.answers == [("co", "acquired")]  # the second has not asked Redis
        release.set()
        r1, r2 = await asyncio.wait_for(asyncio.gather(first, second), 30)
    finally:
        await leases.close()
        await pool.close()

    assert [h.outcome for h in r1.handled] == [APPLIED]
    assert [h.outcome for h in r2.handled] == [DUPLICATE]
    assert calls == [0]
    assert leases.answers == [("co", "acquired"), ("co", "done")]  # never "held"
    assert processor.inflight == {}
    assert await effects(env.pg, env.table) == ["co"]


async def test_swallowed_database_error_fails_the_run_not_the_partition(env, producer):
    # The savepoint is aborted after a failed statement; a handler that catches the error
    # and returns used to fail the whole batch at RELEASE SAVEPOINT, on every redelivery.
    app = env.app()

    @app.handler(env.topic, schema=Pay, key=lambda p: p.id, on_error="reject")
    async def handle(p: Pay, ctx: Context) -> str:
        try:
            await ctx.db.execute("SELECT 1 / 0")
        except asyncpg.DataError:
            pass
        return "carried on"

    async with running(app) as worker:
        spy = Spy(worker)
        bad = await send(producer, env.topic, {"id": "swallow"})
        await wait_offset(env.pg, env.group, env.topic, 0, bad + 1)

    assert spy.at(0, bad) == [REJECTED]
    # Classified by the swallowed error, not by the "transaction is aborted" it left behind.
    assert "DivisionByZeroError" in (await inbox(env.pg, env.ns()))["swallow"]["reason"]
