"""The outbox relay against real Kafka and PostgreSQL (and Redis, for the downstream worker).

Each test gets its own database on the shared PostgreSQL server (``CREATE DATABASE``), so the
relays here see only this test's outbox rows, and other sessions' relays never see them:
counts of published copies are then exact. Topics are unique per test as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from pydantic import BaseModel

from consumer import App, Context, Settings, keys, metrics
from consumer.constants import CONTENT_MSGPACK
from consumer.context import Outgoing
from consumer.db.migrate import migrate_dsn
from consumer.db.pool import create_pool
from consumer.message import Message
from consumer.outbox import envelopes, store
from consumer.outbox.relay import Relay
from consumer.outbox.store import OutboxRow
from consumer.testing import faults
from tests.conftest import (
    app_settings,
    create_topics,
    eventually,
    header_map,
    read_topic,
    running,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
async def db(settings: Settings, unique: str) -> AsyncIterator[Settings]:
    """Settings pointing at a fresh database of this test, with the framework's schema."""
    name = f"relay_{unique}"
    admin = await asyncpg.connect(settings.postgres_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = urlsplit(settings.postgres_dsn)
    dsn = urlunsplit(url._replace(path=f"/{name}"))
    try:
        await migrate_dsn(dsn)
        yield app_settings(settings, postgres_dsn=dsn, relay_poll_ms=100)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def pool(db: Settings) -> AsyncIterator[Any]:
    p = await create_pool(db.postgres_dsn, max_size=4)
    try:
        yield p
    finally:
        await p.close()


@contextlib.asynccontextmanager
async def producer_of(relay: Relay) -> AsyncIterator[AIOKafkaProducer]:
    """The producer ``Relay.run`` would use (idempotent, acks=all), for driving ``tick``."""
    p = await relay.start_producer()
    try:
        yield p
    finally:
        await p.stop()


async def insert(pool: Any, rows: list[OutboxRow]) -> None:
    """Write rows exactly as a batch transaction does (same statement, NOTIFY on commit)."""
    async with pool.acquire() as conn, conn.transaction():
        text, args = store.insert(rows)
        await conn.fetch(text, *args)


async def pending(pool: Any) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM dedup.outbox WHERE published_at IS NULL"))


def row(topic: str, key: str | None, body: dict[str, Any], ik: str) -> OutboxRow:
    headers = (("content-type", CONTENT_MSGPACK), ("idempotency-key", ik))
    return OutboxRow(
        topic, key.encode() if key is not None else None, msgpack.packb(body), headers, ik
    )


async def partitions(settings: Settings, topic: str) -> list[TopicPartition]:
    probe = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await probe.start()
    try:
        return [TopicPartition(topic, p) for p in sorted(await probe.partitions_for(topic))]
    finally:
        await probe.stop()


async def count(settings: Settings, topic: str) -> int:
    """Messages in the topic: the sum of its end offsets (what the broker acknowledged)."""
    tps = await partitions(settings, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


async def drained(pool: Any, relay: Relay | None = None, producer: Any = None) -> None:
    """Wait until no row is pending; with ``relay`` and ``producer``, ticking it meanwhile."""

    async def empty() -> bool:
        if relay is not None:
            await relay.tick(producer)
        return await pending(pool) == 0

    await eventually(empty, timeout_s=60)


@contextlib.asynccontextmanager
async def relaying(relay: Relay) -> AsyncIterator[Relay]:
    """``relay.run()`` in the background, stopped (and awaited) on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield relay
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def until_idle(relay: Relay) -> None:
    """Until ``run()`` finished a pass: a row written after this needs a wake-up or a poll."""

    async def passed() -> bool:
        return relay.loops >= 1

    await eventually(passed)


async def relay_process(db: Settings, log: Path, **env: str) -> asyncio.subprocess.Process:
    """``consumer relay handlers.app:app`` as its own process, on this test's database."""
    environ = {**os.environ, "CONSUMER_POSTGRES_DSN": db.postgres_dsn, **env}
    with log.open("ab") as err:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "consumer.testing.faulty",  # the CLI, with DEDUP_TEST_FAULTS installed
            "relay",
            "handlers.app:app",
            cwd=ROOT,
            env=environ,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
        )


async def stop_process(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise


class Amount(BaseModel):
    n: int


# ---------------------------------------------------------------- crash after the ack


async def test_relay_killed_after_ack_sends_twice_and_downstream_applies_once(
    db: Settings, pool: Any, topics: Any, unique: str, tmp_path: Path
) -> None:
    topic = await topics("relayed")
    source = Message("orders", 1, 7, b"k", b"", (("traceparent", TRACEPARENT.encode()),), 0)
    items = [
        Outgoing(
            topic,
            f"acct-{i}".encode(),
            msgpack.packb({"n": i}),
            (("content-type", CONTENT_MSGPACK),),
        )
        for i in range(3)
    ]
    await insert(pool, envelopes.published(source, "up.settle", f"req-{unique}", items))

    # The relay process dies (os._exit) right after the broker acked its first batch.
    proc = await relay_process(db, tmp_path / "relay.log", DEDUP_TEST_FAULTS="relay_after_ack=1")
    assert await asyncio.wait_for(proc.wait(), 60) == 137, (tmp_path / "relay.log").read_text()
    assert await pending(pool) == 3, "rows were marked although the relay died before marking"
    assert await count(db, topic) == 3

    # The next relay finds the rows still pending and publishes them again.
    relay = Relay(db, pool=pool)
    async with producer_of(relay) as kafka:
        await drained(pool, relay, kafka)
    records = await read_topic(db, topic)
    assert len(records) == 6
    keys = sorted(header_map(r)["idempotency-key"] for r in records)
    assert keys == sorted([f"up.settle:req-{unique}:{i}" for i in range(3)] * 2)
    for r in records:
        h = header_map(r)
        assert h["content-type"] == CONTENT_MSGPACK
        assert h["x-source"] == "orders/1/7"
        assert h["traceparent"] == TRACEPARENT

    # A consumer built with this framework, keyed by the idempotency-key header, applies
    # each message once.
    await pool.execute("CREATE TABLE applied (ik text, n int)")
    app = App(f"down-{unique}", settings=app_settings(db, relay_enabled=False))

    @app.handler(topic, schema=Amount, key="header")
    async def apply(p: Amount, ctx: Context) -> None:
        await ctx.db.execute("INSERT INTO applied VALUES ($1, $2)", ctx.idempotency_key, p.n)

    async with running(app) as worker:

        async def all_seen() -> bool:
            return worker.stats.consumed >= 6

        await eventually(all_seen)
    applied = await pool.fetch("SELECT ik, n FROM applied ORDER BY n")
    assert [(r["ik"], r["n"]) for r in applied] == [
        (f"up.settle:req-{unique}:{i}", i) for i in range(3)
    ]
    assert (worker.stats.by_outcome["applied"], worker.stats.by_outcome["duplicate"]) == (3, 3)


async def test_exception_after_ack_leaves_rows_pending_and_run_recovers(
    db: Settings, pool: Any, topics: Any
) -> None:
    topic = await topics("raised")
    raised = 0

    async def die_once(_: str) -> None:
        nonlocal raised
        if raised == 0:
            raised += 1
            raise RuntimeError("relay died after the ack")

    faults.install("relay_after_ack", die_once)
    relay = Relay(db, pool=pool)
    try:
        async with relaying(relay):
            await insert(pool, [row(topic, f"k{i}", {"n": i}, f"ik-{i}") for i in range(4)])
            await drained(pool)
    finally:
        faults.install("relay_after_ack", None)
    assert raised == 1 and relay.errors == 1
    assert "relay died after the ack" in relay.last_error
    records = await read_topic(db, topic)
    assert sorted(header_map(r)["idempotency-key"] for r in records) == sorted(
        [f"ik-{i}" for i in range(4)] * 2
    )


# ---------------------------------------------------------------- several relays


async def test_relays_racing_lose_nothing_and_keep_per_key_order(
    db: Settings, pool: Any, topics: Any, tmp_path: Path
) -> None:
    topic = await topics("race")
    keys, per_key = 24, 60
    env = {"CONSUMER_RELAY_BATCH": "17", "CONSUMER_RELAY_POLL_MS": "50"}
    logs = [tmp_path / f"relay{i}.log" for i in range(2)]
    procs = [await relay_process(db, log, **env) for log in logs]
    in_process = Relay(db.model_copy(update={"relay_batch": 23}), pool=pool, shards_per_tick=4)
    try:
        # All three relays are up (listening) before the first row is written.
        async def listening() -> bool:
            n = await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE 'LISTEN %'"
            )
            return int(n) == 3

        async with relaying(in_process):
            await eventually(listening)
            # Rows arrive while the relays run, in many small transactions with the keys
            # interleaved: for each key the sequence number grows with the row id.
            for seq in range(per_key):
                await insert(
                    pool,
                    [
                        row(topic, f"key-{k}", {"key": k, "seq": seq}, f"{k}:{seq}")
                        for k in range(keys)
                    ],
                )
            await drained(pool)
    finally:
        codes = [await stop_process(p) for p in procs]
    assert codes == [0, 0], [log.read_text() for log in logs]

    by_key: dict[str, list[int]] = defaultdict(list)
    for r in await read_topic(db, topic):
        body = msgpack.unpackb(r.value)
        assert r.key == f"key-{body['key']}".encode()
        by_key[r.key.decode()].append(body["seq"])
    # Complete, no copy (no relay crashed, so none may have been sent twice), in order.
    assert by_key == {f"key-{k}": list(range(per_key)) for k in range(keys)}
    shares = [in_process.published]
    for log in logs:
        found = re.search(r"relay stopped: published=(\d+)", log.read_text())
        assert found, log.read_text()
        shares.append(int(found.group(1)))
    assert sum(shares) == keys * per_key
    print(f"rows published by each relay: {shares}")


async def test_listen_notify_wakes_an_idle_relay(db: Settings, pool: Any, topics: Any) -> None:
    topic = await topics("notify")
    # Polling once a minute: within the test's time only a NOTIFY can wake it.
    async with relaying(Relay(db.model_copy(update={"relay_poll_ms": 60_000}), pool=pool)) as r:
        await until_idle(r)
        await insert(pool, [row(topic, "k", {"n": 1}, "ik-notify")])
        await drained(pool)
    assert await count(db, topic) == 1


async def test_polling_finds_rows_written_without_notify(
    db: Settings, pool: Any, topics: Any
) -> None:
    topic = await topics("poll")
    async with relaying(Relay(db.model_copy(update={"relay_poll_ms": 100}), pool=pool)) as relay:
        await until_idle(relay)
        r = row(topic, "k", {"n": 1}, "ik-poll")
        await pool.execute(
            """INSERT INTO dedup.outbox (topic, key, value, headers, shard, idempotency_key)
               VALUES ($1, $2, $3, '[]'::jsonb, $4, $5)""",
            r.topic,
            r.key,
            r.value,
            r.shard,
            r.idempotency_key,
        )
        await drained(pool)
    assert await count(db, topic) == 1


# ---------------------------------------------------------------- broker down, poison rows


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_rows_wait_while_the_broker_is_unreachable_then_go_out(
    db: Settings, pool: Any, topics: Any
) -> None:
    topic = await topics("down")
    dead = db.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{_unused_port()}"})
    async with relaying(Relay(dead, pool=pool, backlog_interval_s=0.05)) as relay:
        await insert(pool, [row(topic, "k", {"seq": i}, f"down-{i}") for i in range(5)])

        async def backlog_seen() -> bool:
            return relay.backlog == 5 and relay.oldest_age_s > 0 and relay.errors >= 1

        await eventually(backlog_seen)
    assert await pending(pool) == 5
    assert relay.published == 0
    assert await count(db, topic) == 0

    # The broker is back (here: the relay is given the real one).
    async with relaying(Relay(db, pool=pool, backlog_interval_s=0.05)) as back:

        async def caught_up() -> bool:
            return back.published == 5 and back.backlog == 0

        await eventually(caught_up)
    assert [msgpack.unpackb(r.value)["seq"] for r in await read_topic(db, topic)] == list(range(5))


async def test_a_refused_row_holds_back_only_its_own_key(
    db: Settings, pool: Any, topics: Any, unique: str
) -> None:
    topic = await topics("poison")
    quick = db.model_copy(update={"relay_publish_timeout_ms": 1_000})
    huge = OutboxRow(topic, b"k2", b"x" * (2 * 1024 * 1024), (), "too-big")
    await insert(
        pool,
        [
            row(topic, "k1", {"n": 1}, "ok-1"),
            huge,
            row(topic, "k2", {"n": 2}, "after-too-big"),
            row(f"no-such-topic-{unique}", "k9", {"n": 9}, "nowhere"),
            row(topic, "k3", {"n": 3}, "ok-3"),
        ],
    )
    relay = Relay(quick, pool=pool)
    async with producer_of(relay) as kafka:
        for _ in range(4):
            await relay.tick(kafka)
        left = await pool.fetch(
            "SELECT idempotency_key FROM dedup.outbox WHERE published_at IS NULL ORDER BY id"
        )
        # The too-big row stays, and so does the later row of its key (order); the missing
        # topic's row stays; the rest went out exactly once although four ticks ran.
        assert [r["idempotency_key"] for r in left] == ["too-big", "after-too-big", "nowhere"]
        published = sorted(header_map(r)["idempotency-key"] for r in await read_topic(db, topic))
        assert published == ["ok-1", "ok-3"]
        assert relay.failed >= 1 and relay.out_of_order == 0

        # The operator removes the poison row; once its hold lapses the key moves on.
        await pool.execute("DELETE FROM dedup.outbox WHERE idempotency_key = 'too-big'")

        async def key_moved() -> bool:
            await relay.tick(kafka)
            return bool(
                await pool.fetchval(
                    "SELECT published_at IS NOT NULL FROM dedup.outbox"
                    " WHERE idempotency_key = 'after-too-big'"
                )
            )

        await eventually(key_moved)
    assert await count(db, topic) == 3


# ---------------------------------------------------------------- a topic that stays missing


def _given_up_total() -> float:
    # The counter object itself: render() merges other processes' files when an earlier test
    # in this process switched metrics to multiprocess mode.
    counter = metrics._m().outbox_given_up
    for family in counter.collect():
        for s in family.samples:
            if s.name == "consumer_outbox_abandoned_total" and s.labels == {
                "reason": "reply_topic_missing"
            }:
                return float(s.value)
    return 0.0


async def test_replies_to_a_missing_topic_are_given_up_after_the_bound_and_nothing_else_is(
    db: Settings, pool: Any, topics: Any, unique: str
) -> None:
    # The local broker runs with auto.create.topics.enable=false (scripts/services.sh): a
    # requester's reply-to naming no topic stays missing. Before, such a reply stayed pending
    # forever (held, re-checked, never deleted by retention).
    topic = await topics("flowing")
    missing = f"no-such-replies-{unique}"
    s = db.model_copy(update={"reply_topic_missing_s": 600, "outbox_retention_s": 0})
    old_reply = row(missing, "k1", {"n": 1}, keys.reply_key("ns", "old"))
    young_reply = row(missing, "k2", {"n": 2}, keys.reply_key("ns", "young"))
    event = row(missing, "k3", {"n": 3}, keys.published_key("ns", "ev", 0))
    dead_letter = row(f"{missing}.dlq", "k4", {"n": 4}, f"dlq:{topic}/0/1")
    await insert(pool, [old_reply, young_reply, event, dead_letter, row(topic, "k5", {}, "ok")])
    # Written an hour ago (past the bound), except the young reply.
    await pool.execute(
        "UPDATE dedup.outbox SET created_at = now() - interval '1 hour'"
        " WHERE idempotency_key <> $1",
        young_reply.idempotency_key,
    )
    before = _given_up_total()
    relay = Relay(s, pool=pool, shards_per_tick=64)
    async with producer_of(relay) as kafka:
        assert await relay.tick(kafka) == 1  # the row to the existing topic went out

    pending_left = await pool.fetch(
        "SELECT idempotency_key FROM dedup.outbox WHERE published_at IS NULL ORDER BY id"
    )
    # The old reply left the outbox; the young reply, the event and the dead letter wait for
    # their topics (losing an event or a dead letter would lose data).
    assert [r[0] for r in pending_left] == [
        young_reply.idempotency_key,
        event.idempotency_key,
        dead_letter.idempotency_key,
    ]
    given_up = await pool.fetch(
        "SELECT idempotency_key, given_up FROM dedup.outbox WHERE given_up IS NOT NULL"
    )
    assert [tuple(r) for r in given_up] == [(old_reply.idempotency_key, "reply_topic_missing")]
    assert [header_map(r)["idempotency-key"] for r in await read_topic(db, topic, 1)] == ["ok"]
    assert relay.given_up == {"reply_topic_missing": 1}
    metrics.record_relay(relay)
    assert _given_up_total() - before == 1

    # Retention deletes the given-up reply with the published row; the pending ones stay.
    await relay.housekeeping()
    left = await pool.fetch("SELECT idempotency_key FROM dedup.outbox ORDER BY id")
    assert [r[0] for r in left] == [r[0] for r in pending_left]


async def test_a_missing_topic_does_not_delay_the_rows_of_other_topics(
    db: Settings, pool: Any, topics: Any, unique: str
) -> None:
    """A row to a topic the cluster does not have, ahead of a dead letter to one it has: the
    dead letter goes out in the same tick, without waiting for the missing one to appear.
    Before, each topic absent from fresh metadata got a 10 s wait of its own inside the tick:
    every relay start, and every time its hold lapsed, stalled all publishing 10 s (a worker
    stopped within those 10 s left its dead letters unpublished: test_middleware in CI)."""
    topic = await topics("prompt")
    await insert(
        pool,
        [
            row(f"no-such-{unique}", "k1", {"n": 1}, keys.published_key("ns", "a", 0)),
            row(topic + ".dlq", "k2", {"n": 2}, f"dlq:{topic}/0/1"),
        ],
    )
    relay = Relay(db, pool=pool, shards_per_tick=64)
    async with producer_of(relay) as kafka:
        # 5 s: far more than a tick takes here, half the wait the tick used to make.
        assert await asyncio.wait_for(relay.tick(kafka), 5) == 1
    assert len(await read_topic(db, topic + ".dlq", expect=1)) == 1


def _missing_topic_gauge(topic: str) -> float | None:
    gauge = metrics._m().outbox_missing_topic  # the object: see _given_up_total
    for family in gauge.collect():
        for s in family.samples:
            if s.labels == {"topic": topic}:
                return float(s.value)
    return None


async def test_rows_to_a_missing_topic_are_a_metric_and_a_warning_of_our_own(
    db: Settings, pool: Any, topics: Any, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Auto-creation off (scripts/services.sh): two events and a dead letter to topics that do
    not exist wait in the outbox. The relay says so itself (one warning per topic, with the
    row count), the gauge counts them, and aiokafka's own "not found in cluster metadata"
    line comes at most once per topic, however many metadata refreshes the ticks cause."""
    caplog.set_level(logging.WARNING)
    topic = await topics("flowing")
    missing, missing_dlq = f"no-such-events-{unique}", f"no-such-{unique}.dlq"
    await insert(
        pool,
        [
            row(missing, "k1", {"n": 1}, keys.published_key("ns", "a", 0)),
            row(missing, "k2", {"n": 2}, keys.published_key("ns", "b", 0)),
            row(missing_dlq, "k3", {"n": 3}, f"dlq:{topic}/0/7"),
            row(topic, "k4", {}, "ok"),
        ],
    )
    relay = Relay(db, pool=pool, shards_per_tick=64)
    async with producer_of(relay) as kafka:
        assert await relay.tick(kafka) == 1  # the row to the existing topic
        for _ in range(3):  # held back: nothing more goes, nothing is given up
            assert await relay.tick(kafka) == 0
        await relay.refresh_backlog()
    assert relay.missing_topic_rows == {missing: 2, missing_dlq: 1}
    assert await pending(pool) == 3
    metrics.record_relay(relay)
    assert (_missing_topic_gauge(missing), _missing_topic_gauge(missing_dlq)) == (2.0, 1.0)
    ours = [r.getMessage() for r in caplog.records if "wait for topic" in r.getMessage()]
    assert sorted(ours) == sorted(
        f"relay: {n} outbox row(s) wait for topic {t!r}, which does not exist; create it "
        "(`consumer topics MODULE:APP --create` makes the dlq, conflicts and declared ones)"
        for t, n in ((missing, 2), (missing_dlq, 1))
    )
    client = [r for r in caplog.records if "not found in cluster metadata" in r.getMessage()]
    for name in (missing, missing_dlq):
        assert len([r for r in client if name in r.getMessage()]) <= 1

    # The topics created, their rows go out; the next report finds nothing waiting.
    await create_topics(db, [missing, missing_dlq], partitions=1)
    for name in (missing, missing_dlq):
        relay._holds.release(name)  # the hold ends now rather than in a sleep
    async with producer_of(relay) as kafka:
        await drained(pool, relay, kafka)
    relay._next_missing_report = 0.0  # the report is due (its timer is a minute)
    await relay.refresh_backlog()
    assert relay.missing_topic_rows == {}
    metrics.record_relay(relay)
    assert (_missing_topic_gauge(missing), _missing_topic_gauge(missing_dlq)) == (0.0, 0.0)


# ---------------------------------------------------------------- replies


class Deposit(BaseModel):
    id: str
    cents: int


async def test_a_duplicate_request_gets_the_stored_reply_again(
    db: Settings, topics: Any, producer: AIOKafkaProducer, pool: Any, unique: str
) -> None:
    requests = await topics("deposits", extra=("replies",))
    replies = f"replies-{unique}"
    app = App(f"bank-{unique}", settings=app_settings(db))
    runs = 0

    @app.handler(requests, schema=Deposit, key=lambda p: p.id)
    async def deposit(p: Deposit, ctx: Context) -> dict[str, Any]:
        nonlocal runs
        runs += 1
        return {"id": p.id, "credited": p.cents}

    def request(cents: int) -> dict[str, Any]:
        return {
            "value": msgpack.packb({"id": "d1", "cents": cents}),
            "key": b"d1",
            "headers": [("reply-to", replies.encode()), ("traceparent", TRACEPARENT.encode())],
        }

    async def on_topic(name: str, n: int) -> None:
        async def check() -> bool:
            return await count(db, name) >= n

        await eventually(check)

    async with running(app):
        await producer.send_and_wait(requests, **request(100))
        await on_topic(replies, 1)
        # The requester retries: same key, same payload, after the first was done.
        await producer.send_and_wait(requests, **request(100))
        await on_topic(replies, 2)
        # The same key with another payload is a conflict: never answered.
        await producer.send_and_wait(requests, **request(999))
        await on_topic(requests + ".conflicts", 1)
        await drained(pool)

    assert runs == 1
    answers = await read_topic(db, replies)
    assert len(answers) == 2
    first, again = (header_map(r) for r in answers)
    assert first["idempotency-key"] == again["idempotency-key"] == f"reply:bank-{unique}.deposit:d1"
    assert first["x-outcome"] == again["x-outcome"] == "done"
    assert first["traceparent"] == TRACEPARENT and first["content-type"] == CONTENT_MSGPACK
    assert [msgpack.unpackb(r.value) for r in answers] == [{"id": "d1", "credited": 100}] * 2
    conflict = header_map((await read_topic(db, requests + ".conflicts"))[0])
    assert conflict["x-reason"] == "conflict" and "idempotency-key" in conflict


# ---------------------------------------------------------------- retention


async def test_retention_deletes_only_what_is_past_its_window(db: Settings, pool: Any) -> None:
    s = db.model_copy(
        update={"outbox_retention_s": 3600, "dedup_window_s": 86_400, "cleanup_batch": 2}
    )
    await pool.execute(
        """
        INSERT INTO dedup.outbox (topic, value, shard, idempotency_key, created_at, published_at)
        SELECT 't', ''::bytea, 0, label || n, now() - created, now() - published
        FROM (VALUES ('old-', interval '3 hours', interval '2 hours'),
                     ('recent-', interval '2 hours', interval '59 minutes'),
                     ('unpublished-', interval '5 hours', NULL)) v(label, created, published),
             generate_series(1, 5) n
        """
    )
    await pool.execute(
        """
        INSERT INTO dedup.inbox (namespace, key, payload_hash, hash_alg, status, topic,
                                 partition, "offset", first_seen_at, completed_at)
        SELECT 'ns', label || n, 'h', 'a', 'done', 't', 0, n, now() - age, now() - age
        FROM (VALUES ('expired-', interval '25 hours'),
                     ('kept-', interval '23 hours')) v(label, age),
             generate_series(1, 5) n
        """
    )
    relay = Relay(s, pool=pool)
    await relay.housekeeping()

    outbox_left = await pool.fetch("SELECT idempotency_key FROM dedup.outbox ORDER BY 1")
    inbox_left = await pool.fetch("SELECT key FROM dedup.inbox ORDER BY 1")
    assert [r[0] for r in outbox_left] == sorted(
        [f"recent-{n}" for n in range(1, 6)] + [f"unpublished-{n}" for n in range(1, 6)]
    )
    assert [r[0] for r in inbox_left] == sorted(f"kept-{n}" for n in range(1, 6))
    # The backlog figures come from the same pass: five rows, the oldest five hours old.
    assert relay.backlog == 5
    assert 5 * 3600 - 60 < relay.oldest_age_s < 5 * 3600 + 60


async def test_retention_never_waits_on_rows_another_cleaner_holds(db: Settings, pool: Any) -> None:
    s = db.model_copy(update={"outbox_retention_s": 0, "cleanup_batch": 10})
    await pool.execute(
        """
        INSERT INTO dedup.outbox (topic, value, shard, idempotency_key, published_at)
        SELECT 't', ''::bytea, 0, 'r' || n, now() - interval '1 minute'
        FROM generate_series(1, 4) n
        """
    )
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute(
            "SELECT 1 FROM dedup.outbox WHERE idempotency_key IN ('r1', 'r2') FOR UPDATE"
        )
        async with pool.acquire() as conn:
            from consumer.outbox import retention

            purged = await asyncio.wait_for(retention.purge(conn, s), 10)
    assert purged.outbox == 2
    left = await pool.fetch("SELECT idempotency_key FROM dedup.outbox ORDER BY 1")
    assert [r[0] for r in left] == ["r1", "r2"]


async def test_a_dead_letter_too_large_to_publish_goes_out_without_its_value(
    db: Settings, pool: Any, topics: Any
) -> None:
    """A record that fitted in Kafka plus the envelope's headers can exceed the producer's
    max_request_size: the dead letter stayed pending forever and held back every later dead
    letter of its key. Now it is published without its value, saying so (x-truncated)."""
    topic = await topics("bigdlq", partitions=1)
    dlq = topic + ".dlq"
    big = Message(topic, 0, 7, None, b"x" * (1024 * 1024 - 200), (("trace", b"t"),))
    later = Message(topic, 0, 8, None, b"\xc1", ())
    letters = [envelopes.dead_letter(m, "undecodable", "not valid msgpack") for m in (big, later)]
    await insert(pool, letters)
    relay = Relay(db, pool=pool)
    async with producer_of(relay) as kafka:
        for _ in range(2):
            await relay.tick(kafka)
    assert await pending(pool) == 0
    first, second = await read_topic(db, dlq)
    headers = header_map(first)
    assert first.value == b"" and "too large" in headers["x-truncated"]
    assert (headers["x-source"], headers["trace"], headers["x-reason"]) == (
        f"{topic}/0/7",
        "t",
        "undecodable",
    )
    assert "x-original-headers" not in headers
    assert second.value == b"\xc1" and "x-truncated" not in header_map(second)
    assert relay.truncated == 1


async def test_a_dead_letter_whose_headers_alone_are_too_large_goes_out_without_them(
    db: Settings, pool: Any, topics: Any
) -> None:
    """A record with ~600 KB of binary headers fits in Kafka, but its dead letter shows them
    as hex (1.2 MB) besides x-original-headers: sent without its value it was still too large,
    refused on every tick, and held back every later dead letter of its key forever. Now the
    headers too large to keep are left out as well, named in x-truncated."""
    topic = await topics("bighdr", partitions=1)
    dlq = topic + ".dlq"
    blob = b"\xff" * (600 * 1024)
    big = Message(topic, 0, 7, b"k", b"\xc1", (("blob", blob), ("trace", b"t")))
    later = Message(topic, 0, 8, b"k", b"\xc1", ())
    letters = [envelopes.dead_letter(m, "undecodable", "not valid msgpack") for m in (big, later)]
    await insert(pool, letters)
    relay = Relay(db, pool=pool)
    async with producer_of(relay) as kafka:
        for _ in range(2):
            await relay.tick(kafka)
    assert await pending(pool) == 0
    first, second = await read_topic(db, dlq)
    headers = header_map(first)
    assert first.value == b"" and "blob.hex" in headers["x-truncated"]
    assert "blob.hex" not in headers and "x-original-headers" not in headers
    assert (headers["x-source"], headers["trace"], headers["x-reason"]) == (
        f"{topic}/0/7",
        "t",
        "undecodable",
    )
    assert "x-truncated" not in header_map(second)
