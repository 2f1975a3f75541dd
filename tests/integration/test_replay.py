"""`consumer replay`: dead letters that failed transiently apply once their dependency is back.

A message whose transient failures outlast ``max_attempts`` is dead-lettered as ``failed`` and
nothing is recorded (consumer/runtime/invoke.py). Replaying it must apply it exactly once,
replaying again must send nothing new, and definite outcomes (``rejected``) stay where they are.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
import pytest
from aiokafka import AIOKafkaConsumer
from pydantic import BaseModel
from typer.testing import CliRunner

import consumer.replay
from consumer import App, Context, Reject
from consumer.cli import cli
from consumer.replay import TopicMissing, replay
from schemas.payments import PaymentRequested
from tests.conftest import app_settings, eventually, read_topic, running
from tests.integration.dedup_support import cleanup, wait_offset

pytestmark = pytest.mark.integration


async def test_failed_dead_letters_replay_once(settings, topics, producer, pg, unique):
    topic = await topics("replay", partitions=2)
    dlq = topic + ".dlq"
    table = f"replay_{unique}"
    await pg.execute(f"CREATE TABLE {table} (k text)")
    app = App(
        f"g-{unique}",
        settings=app_settings(settings, max_attempts=2, retry_backoff_ms=10),
    )
    dependency = {"up": False}
    runs: list[str] = []

    # Keyed by the idempotency-key header: the dead letter replaces that header, so the
    # replay must restore it or the copies would be invalid (missing_key).
    @app.handler(topic, schema=PaymentRequested)
    async def settle(p: PaymentRequested, ctx: Context) -> str:
        runs.append(ctx.idempotency_key)
        if p.cents < 0:
            raise Reject("negative amount")
        if not dependency["up"]:
            raise ConnectionError("ledger service unreachable")
        await ctx.db.execute(f"INSERT INTO {table} VALUES ($1)", ctx.idempotency_key)
        return "settled"

    def m(cents: int) -> bytes:
        return msgpack.packb({"payment_id": "p", "account": "a", "cents": cents})

    for key, cents, part in [("k1", 1, 0), ("k2", 2, 1), ("k3", -1, 0), ("k1", 1, 1)]:
        await producer.send_and_wait(
            topic, m(cents), partition=part, headers=[("idempotency-key", key.encode())]
        )

    async with running(app) as worker:
        # k1 twice (two partitions: two dead letters), k2 failed; k3 rejected (definite).
        letters = await read_topic(settings, dlq, expect=4)
        reasons = sorted(dict(r.headers)["x-reason"].decode() for r in letters)
        assert reasons == ["failed", "failed", "failed", "rejected"]
        assert await pg.fetchval(f"SELECT count(*) FROM {table}") == 0
        assert (
            await pg.fetchval(
                "SELECT count(*) FROM dedup.inbox WHERE namespace = $1 AND key IN ('k1', 'k2')",
                settle.name,
            )
            == 0
        )  # the failures burned no key

        dependency["up"] = True
        dry = await replay(app, app.settings, dlq, dry_run=True)
        assert (dict(dry.replayed), dict(dry.skipped)) == ({"failed": 3}, {"rejected": 1})
        first = await replay(app, app.settings, dlq)
        assert (first.read, dict(first.replayed), dict(first.skipped)) == (
            4,
            {"failed": 3},
            {"rejected": 1},
        )  # the dry run moved no position

        async def settled() -> bool:
            return worker.stats.by_outcome["applied"] + worker.stats.by_outcome["duplicate"] >= 3

        await eventually(settled)
        again = await replay(app, app.settings, dlq)
        assert (again.read, sum(again.replayed.values())) == (0, 0)

    rows = await pg.fetch(f"SELECT k FROM {table} ORDER BY k")
    assert [r["k"] for r in rows] == ["k1", "k2"]  # k1's two dead letters: applied once
    assert worker.stats.by_outcome["applied"] == 2
    assert worker.stats.by_outcome["duplicate"] == 1
    assert runs.count("k3") == 1  # the rejection was not replayed
    replayed = [
        dict(r.headers)
        for r in await read_topic(settings, topic)
        if r.headers and "x-replayed-from" in dict(r.headers)
    ]
    assert len(replayed) == 3
    for headers in replayed:
        assert headers["idempotency-key"] in (b"k1", b"k2")
        assert not {"x-reason", "x-detail", "x-source"} & headers.keys()
    await pg.execute(f"DROP TABLE {table}")
    await cleanup(pg, unique, settings.redis_url)


@pytest.mark.parametrize("topic", ["elsewhere.dlq", "payments.requested"])
def test_replay_refuses_a_topic_that_is_not_one_of_the_apps_dead_letter_topics(monkeypatch, topic):
    # The app's own input topic too: replaying it would re-send every record there carrying
    # x-reason: failed.
    async def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("replay started")

    monkeypatch.setattr(consumer.replay, "replay", must_not_run)
    out = CliRunner().invoke(cli, ["replay", "handlers.app:app", topic])
    assert out.exit_code == 2, out.output
    assert "not the dead-letter topic" in out.output


async def test_a_missing_topic_is_reported_not_created(settings, unique):
    app = App(f"g-{unique}", settings=app_settings(settings))
    topic = f"never-{unique}"

    @app.handler(topic, schema=PaymentRequested)
    async def settle(p: PaymentRequested, ctx: Context) -> None:
        return None

    with pytest.raises(TopicMissing, match=f"{topic}.dlq"):
        await replay(app, app.settings, topic + ".dlq")
    probe = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await probe.start()
    try:
        assert topic + ".dlq" not in await probe.topics()
    finally:
        await probe.stop()


async def test_dead_letters_older_than_the_dedup_window_are_not_replayed(
    settings, topics, producer
):
    """Past the window the key's record may be gone, so a key applied meanwhile by a later
    copy would apply again: such dead letters are counted as expired unless forced."""
    window_s = 3600
    topic = await topics("replay-window", partitions=1)
    app = App(f"g-{topic}", settings=app_settings(settings, dedup_window_s=window_s))

    @app.handler(topic, schema=PaymentRequested)
    async def settle(p: PaymentRequested, ctx: Context) -> None:
        return None

    def letter(age_s: float, offset: int) -> dict[str, Any]:
        return {
            "value": msgpack.packb({"payment_id": "p", "account": "a", "cents": 1}),
            "partition": 0,
            "timestamp_ms": int((time.time() - age_s) * 1000),
            "headers": [
                ("x-reason", b"failed"),
                ("x-idempotency-key", f"k{offset}".encode()),
                ("x-source", f"{topic}/0/{offset}".encode()),
            ],
        }

    await producer.send_and_wait(topic + ".dlq", **letter(2 * window_s, 0))
    await producer.send_and_wait(topic + ".dlq", **letter(60, 1))
    dry = await replay(app, app.settings, topic + ".dlq", dry_run=True)
    assert (dry.read, dict(dry.replayed), dict(dry.expired)) == (2, {"failed": 1}, {"failed": 1})
    forced = await replay(app, app.settings, topic + ".dlq", dry_run=True, force=True)
    assert dict(forced.replayed) == {"failed": 2}


async def test_invalid_schema_dead_letter_of_a_header_keyed_message_replays_once(
    settings, topics, producer, pg, unique
):
    """Issue 13 #4: the dead letter replaced the idempotency-key header and recorded an empty
    x-idempotency-key (the key is derived after validation), so a replay after the schema was
    fixed sent a copy without a key: missing_key, lost. Now every dead letter keeps the
    original headers exactly and the replay restores them."""
    topic = await topics("replay-schema", partitions=1)
    dlq = topic + ".dlq"
    group = f"g-{unique}"
    table = f"replay_schema_{unique}"
    await pg.execute(f"CREATE TABLE {table} (k text, cents text)")
    original = [
        ("idempotency-key", b"pay-7"),
        ("trace-me", b"\xff\x00binary"),  # not text: kept as bytes, not as "trace-me.hex"
        ("x-source", b"upstream/3/9"),  # a name the envelope also sets
    ]
    value = msgpack.packb({"payment_id": "p", "account": "a", "cents": "12.50"})

    class StrictPay(BaseModel):
        payment_id: str
        cents: int

    class LooserPay(BaseModel):  # the fixed schema, deployed as the same handler
        payment_id: str
        cents: int | str

    def version(schema: type[BaseModel]) -> App:
        app = App(group, settings=app_settings(settings))

        @app.handler(topic, schema=schema)
        async def settle(p: Any, ctx: Context) -> str:
            await ctx.db.execute(
                f"INSERT INTO {table} VALUES ($1, $2)", ctx.idempotency_key, str(p.cents)
            )
            return "settled"

        return app

    await producer.send_and_wait(topic, value, partition=0, headers=original)
    async with running(version(StrictPay)):
        (letter,) = await read_topic(settings, dlq, expect=1)
    assert dict(letter.headers)["x-reason"] == b"invalid_schema"

    fixed = version(LooserPay)
    summary = await replay(fixed, fixed.settings, dlq, reasons=("invalid_schema",))
    assert dict(summary.replayed) == {"invalid_schema": 1}
    assert (await replay(fixed, fixed.settings, dlq, reasons=("invalid_schema",))).read == 0
    async with running(fixed) as worker:
        await wait_offset(pg, group, topic, 0, 2)  # the replayed copy is decided

    rows = await pg.fetch(f"SELECT k, cents FROM {table}")
    assert [(r["k"], r["cents"]) for r in rows] == [("pay-7", "12.50")]
    assert (worker.stats.by_outcome["applied"], worker.stats.by_outcome["invalid"]) == (1, 0)
    sent = await read_topic(settings, topic)
    assert len(sent) == 2
    assert list(sent[1].headers) == [*original, ("x-replayed-from", f"{dlq}/0/0".encode())]
    assert (sent[1].value, sent[1].key) == (value, None)
    await pg.execute(f"DROP TABLE {table}")
    await cleanup(pg, unique, settings.redis_url)
