"""What a handler returns or raises must never stall its partition, and every copy of a key
gets a byte-identical reply (issue 13, findings 11 and 12).

Driven as tests/integration/test_poison.py does: BatchProcessor on real PostgreSQL, records
built here, redelivered from the retry position a bounded number of times. A result the
runtime cannot store and answer identically (an int beyond 64 bits) is checked while the
message's savepoint is open and dead-lettered at once as ``unstorable``; a ``Reject`` with
any reason object is recorded with that reason as text; a reply is encoded from the stored
form (consumer/storable.py), so the first copy's reply and a duplicate's are the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest

from consumer import App, Context, Reject, Retry
from consumer.errors import MAX_RETRY_DELAY_S
from consumer.storable import MAX_REASON_CHARS
from consumer.testing import TestApp
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
ROUNDS = MAX_ATTEMPTS + 3


@pytest.fixture
async def env(settings, pg, unique) -> AsyncIterator[dict[str, Any]]:
    async with direct_env(settings, pg, unique, "results", max_attempts=MAX_ATTEMPTS) as e:
        e["replies"] = f"replies-{unique}"
        yield e


def _reply_to(env: dict[str, Any]) -> dict[str, bytes]:
    return {"reply-to": env["replies"].encode()}


# ---------------------------------------------------------------- finding 11: results


@pytest.mark.parametrize("asks", ["first_copy_asks", "only_a_later_copy_asks"])
async def test_a_result_beyond_64_bits_is_dead_lettered_not_a_stall(env, pg, asks):
    """msgpack cannot encode an int >= 2**64: the reply failed outside the savepoint and the
    batch was retried forever (or, stored without a reply, a later copy's reply did)."""
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        return {"n": 2**64} if p.id == "big" else {"ok": 1}

    topic, processor = env["topic"], direct_processor(app, env)
    first = _reply_to(env) if asks == "first_copy_asks" else {}
    await drive(processor, [record(topic, 0, {"id": "big"}, headers=first)], ROUNDS)
    await drive(processor, [record(topic, 1, {"id": "ok"})], ROUNDS)
    await drive(processor, [record(topic, 2, {"id": "big"}, headers=_reply_to(env))], ROUNDS)

    assert await stored_offset(pg, env["group"], topic, 0) == 3
    rows = await inbox(pg, handle.name)
    assert set(rows) == {"ok"}  # nothing recorded under the culprit's key: it stays free
    dead = await outbox(pg, topic + ".dlq")
    assert [d["headers"]["x-reason"] for d in dead] == ["unstorable", "unstorable"]
    assert "64-bit" in dead[0]["headers"]["x-detail"]
    assert await outbox(pg, env["replies"]) == []


@pytest.mark.parametrize(
    "result",
    [
        {"b": 1, "a": 2, "aa": 3},  # jsonb orders keys its own way
        {"big": 1e20, "e16": 1e16, "huge": 2.0**70, "neg0": -0.0, "one": 1.0, "tenth": 0.1},
        [1.7976931348623157e308, 5e-324, 1.5e-07, 12345678901234567.0],
    ],
    ids=["key_order", "exponent_floats", "extreme_floats"],
)
async def test_every_copy_gets_a_byte_identical_reply(env, pg, result):
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        return result

    topic, processor = env["topic"], direct_processor(app, env)
    for offset in range(3):  # three batches: the copies after the first read PostgreSQL
        msg = record(topic, offset, {"id": "k"}, headers=_reply_to(env))
        await drive(processor, [msg], ROUNDS)

    assert await stored_offset(pg, env["group"], topic, 0) == 3
    replies = await outbox(pg, env["replies"])
    assert [r["headers"]["x-source"] for r in replies] == [f"{topic}/0/{i}" for i in range(3)]
    assert len({r["value"] for r in replies}) == 1, [r["value"] for r in replies]
    assert msgpack.unpackb(replies[0]["value"]) == result  # the values themselves are kept


async def test_the_harness_answers_with_the_runtime_bytes(settings, unique):
    """TestApp (MemoryTx, results through json) and TestApp on PostgreSQL (PgTx, jsonb) give
    the same reply bytes for the first copy and a duplicate."""
    result = {"z": 1e20, "a": [-0.0, 1.0], "m": {"y": 1, "x": 2}}

    def make() -> App:
        app = App(f"g-{unique}", settings=settings)

        @app.handler("parity", schema=Pay, key=lambda p: p.id)
        async def handle(p: Pay, ctx: Context) -> Any:
            return result

        return app

    seen = []
    for db in (None, settings.postgres_dsn):
        async with TestApp(make(), db=db) as t:
            first = await t.send("parity", {"id": "k"}, headers={"reply-to": "parity.replies"})
            again = await t.send("parity", {"id": "k"}, headers={"reply-to": "parity.replies"})
            assert again.result == first.result
            seen += [m.value for m in t.published("parity.replies")]
    assert len(seen) == 4 and len(set(seen)) == 1, seen


async def test_a_result_nested_too_deeply_is_dead_lettered(env, pg):
    app = App(env["group"], settings=env["settings"])
    deep: Any = 1
    for _ in range(600):  # past msgpack's nesting limit (511), within json's
        deep = [deep]

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        return deep if p.id == "deep" else 1

    topic = env["topic"]
    msgs = [
        record(topic, 0, {"id": "deep"}, headers=_reply_to(env)),
        record(topic, 1, {"id": "ok"}),
    ]
    await drive(direct_processor(app, env), msgs, ROUNDS)
    assert await stored_offset(pg, env["group"], topic, 0) == 2
    dead = await outbox(pg, topic + ".dlq")
    assert [d["headers"]["x-reason"] for d in dead] == ["unstorable"]


# ---------------------------------------------------------------- finding 12: Reject reasons


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")

    def __repr__(self) -> str:
        raise RuntimeError("no")


class _BareReject(Reject):
    """A subclass that never calls Reject.__init__ (so has no .reason)."""

    def __init__(self, code: int) -> None:
        self.code = code


REASONS: list[tuple[str, Any, str]] = [
    ("exception", lambda: Reject(ValueError("bad amount")), "ValueError: bad amount"),
    ("none", lambda: Reject(None), "rejected"),
    ("int", lambda: Reject(123), "123"),
    ("nul_and_surrogate", lambda: Reject("a\x00b\ud800c"), "a\\x00b\\ud800c"),
    ("unprintable", lambda: Reject(_Unprintable()), "<_Unprintable that cannot be printed>"),
    ("subclass_without_init", lambda: _BareReject(7), "_BareReject: 7"),
]


@pytest.mark.parametrize(
    ("make", "expected"), [r[1:] for r in REASONS], ids=[r[0] for r in REASONS]
)
async def test_any_reject_reason_is_recorded_as_text(env, pg, make, expected):
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        if p.id == "bad":
            raise make()
        return 1

    topic = env["topic"]
    msgs = [record(topic, 0, {"id": "bad"}, headers=_reply_to(env)), record(topic, 1, {"id": "ok"})]
    await drive(direct_processor(app, env), msgs, ROUNDS)

    assert await stored_offset(pg, env["group"], topic, 0) == 2
    rows = await inbox(pg, handle.name)
    assert (rows["bad"]["status"], rows["bad"]["reason"]) == ("rejected", expected)
    dead = await outbox(pg, topic + ".dlq")
    assert [(d["headers"]["x-reason"], d["headers"]["x-detail"]) for d in dead] == [
        ("rejected", expected)
    ]
    reply = (await outbox(pg, env["replies"]))[0]
    assert msgpack.unpackb(reply["value"]) == {"rejected": expected}


async def test_a_huge_reject_reason_is_truncated(env, pg):
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        raise Reject("x" * 5_000_000)

    await drive(direct_processor(app, env), [record(env["topic"], 0, {"id": "k"})], ROUNDS)
    reason = (await inbox(pg, handle.name))["k"]["reason"]
    assert reason.startswith("x" * MAX_REASON_CHARS + "... (")
    assert len(reason) < MAX_REASON_CHARS + 100


# ---------------------------------------------------------------- Retry delays


@pytest.mark.parametrize(
    ("delay", "expected"),
    [
        (math.inf, MAX_RETRY_DELAY_S),
        (1e12, MAX_RETRY_DELAY_S),
        (10**400, MAX_RETRY_DELAY_S),
        (-5.0, 0.0),
        (math.nan, None),
        ("5", None),
    ],
    ids=["inf", "huge", "huge_int", "negative", "nan", "text"],
)
async def test_a_retry_delay_is_one_the_worker_can_wait(env, pg, delay, expected):
    """Retry(inf) paused the partition forever (loop.call_later(inf)); NaN fired at once;
    a text delay raised inside the worker. None: the handler's usual back-off."""
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        raise Retry(delay_s=delay)

    results = await drive(
        direct_processor(app, env), [record(env["topic"], 0, {"id": "k"})], ROUNDS
    )
    delays = [r.retry_delay_s for r in results if r.retry_offset is not None]
    assert len(delays) == MAX_ATTEMPTS - 1  # then dead-lettered as failed
    backoff = env["settings"].retry_backoff_ms / 1000
    for d in delays:
        assert isinstance(d, float) and math.isfinite(d)
        assert d == expected if expected is not None else backoff <= d <= 1.0
    dead = await outbox(pg, env["topic"] + ".dlq")
    assert [d["headers"]["x-reason"] for d in dead] == ["failed"]


async def test_a_publish_too_large_for_the_relay_is_the_handlers_failure(env, pg):
    """Written to the outbox, it was refused by the relay's producer on every tick, forever
    (and held back every later message of its key). Now checked in the savepoint."""
    app = App(env["group"], settings=env["settings"])
    out = env["topic"] + ".out"

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        ctx.publish(out, {"blob": "x" * (1024 * 1024 if p.id == "big" else 10)}, key=p.id)
        return 1

    topic = env["topic"]
    msgs = [record(topic, 0, {"id": "big"}), record(topic, 1, {"id": "ok"})]
    await drive(direct_processor(app, env), msgs, ROUNDS)
    assert await stored_offset(pg, env["group"], topic, 0) == 2
    assert [r["headers"]["x-source"] for r in await outbox(pg, out)] == [f"{topic}/0/1"]
    dead = await outbox(pg, topic + ".dlq")
    assert [d["headers"]["x-reason"] for d in dead] == ["unstorable"]
    assert "more than the relay can send" in dead[0]["headers"]["x-detail"]
