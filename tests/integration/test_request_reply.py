"""Request/reply against the real services: a worker of this framework answers, a requester
(FastStream's KafkaBroker, or consumer.Requester) matches the replies by correlation id.

What each test proves:

* a FastStream client's JSON request gets a JSON reply carrying its ``correlation_id``, which
  FastStream's own parser reads back (the interop the issue asked for);
* the reply's content type is the request's (msgpack in, msgpack out; JSON in, JSON out)
  unless the handler's ``reply_content_type`` says otherwise;
* a duplicate request, even in another content type and with its own correlation id, gets a
  reply whose payload is byte-identical to the first one's, matched by *its* correlation id;
* a request nobody answers ends in ``RequestTimeout``, one line saying what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from typing import Any

import msgpack
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from faststream.exceptions import FeatureNotSupportedException
from faststream.kafka import KafkaBroker, KafkaMessage

from consumer import App, Context, Requester, RequestTimeout
from consumer.constants import CONTENT_JSON, CONTENT_MSGPACK
from tests.conftest import app_settings, running
from tests.integration.dedup_support import Pay, cleanup, outbox, send, wait_offset

pytestmark = pytest.mark.integration


def _doubling_app(group: str, settings: Any, topic: str, calls: Counter[str], **opts: Any) -> App:
    app = App(group, settings=app_settings(settings))

    @app.handler(topic, schema=Pay, key=lambda p: p.id, **opts)
    async def double(p: Pay, ctx: Context) -> dict[str, Any]:
        calls[p.id] += 1
        return {"id": p.id, "cents": p.cents * 2}

    return app


async def test_faststream_client_gets_json_replies_matched_by_its_correlation_id(
    settings, topics, unique
):
    topic = await topics("rr-fs", partitions=2, extra=("fs-replies",))
    reply_topic = f"fs-replies-{unique}"
    calls: Counter[str] = Counter()
    app = _doubling_app(f"g-{unique}", settings, topic, calls)

    broker = KafkaBroker(settings.kafka_bootstrap)
    waiting: dict[str, asyncio.Future[tuple[Any, str | None, dict[str, Any]]]] = {}

    # FastStream 0.7's KafkaBroker.request() works only under its TestKafkaBroker
    # (faststream/kafka/publisher/producer.py: "Kafka doesn't support `request` method
    # without test client"); on a real broker its request/reply is publish(reply_to=...,
    # correlation_id=...) and a subscriber on the reply topic, matching by the
    # correlation_id its parser reads from the reply's headers (faststream/kafka/parser.py).
    @broker.subscriber(reply_topic, group_id=f"fs-{unique}", auto_offset_reset="earliest")
    async def on_reply(body: Any, msg: KafkaMessage) -> None:
        fut = waiting.get(msg.correlation_id or "")
        if fut is not None and not fut.done():
            fut.set_result((body, msg.content_type, dict(msg.headers)))

    async with running(app):
        await broker.start()
        try:
            # If this stops raising, FastStream can request on Kafka: use it in this test.
            with pytest.raises(FeatureNotSupportedException):
                await broker.request({"id": "x"}, topic)
            cids = {f"cid-{i}-{unique}": f"o-{i}" for i in range(3)}
            loop = asyncio.get_running_loop()
            for cid, oid in cids.items():
                waiting[cid] = loop.create_future()
                await broker.publish(
                    {"id": oid, "cents": 5}, topic=topic, correlation_id=cid, reply_to=reply_topic
                )
            got = {cid: await asyncio.wait_for(fut, 60) for cid, fut in waiting.items()}
        finally:
            await broker.stop()

    for cid, oid in cids.items():
        body, content_type, headers = got[cid]
        assert body == {"id": oid, "cents": 10}  # decoded by FastStream from JSON
        assert content_type == CONTENT_JSON
        assert headers["correlation_id"] == cid
        assert headers["x-outcome"] == "done"
    assert calls == Counter(cids.values())


async def test_reply_is_in_the_request_content_type_unless_the_handler_says(
    settings, topics, producer, unique
):
    plain = await topics("rr-ct", partitions=1, extra=("ct-replies",))
    fixed = await topics("rr-fixed", partitions=1)
    reply_topic = f"ct-replies-{unique}"
    calls: Counter[str] = Counter()
    app = _doubling_app(f"g-{unique}", settings, plain, calls)

    @app.handler(fixed, schema=Pay, key=lambda p: p.id, reply_content_type=CONTENT_MSGPACK)
    async def fixed_msgpack(p: Pay, ctx: Context) -> dict[str, Any]:
        return {"id": p.id}

    async with running(app), Requester(producer, reply_topic) as r:
        packed = await r.request(plain, {"id": "m", "cents": 3}, timeout_s=60)
        as_json = await r.request(
            plain, {"id": "j", "cents": 4}, content_type=CONTENT_JSON, timeout_s=60
        )
        forced = await r.request(
            fixed, {"id": "f", "cents": 1}, content_type=CONTENT_JSON, timeout_s=60
        )

    assert (packed.content_type, msgpack.unpackb(packed.raw)) == (
        CONTENT_MSGPACK,
        {"cents": 6, "id": "m"},
    )
    assert (as_json.content_type, json.loads(as_json.raw)) == (
        CONTENT_JSON,
        {"cents": 8, "id": "j"},
    )
    assert (forced.content_type, msgpack.unpackb(forced.raw)) == (CONTENT_MSGPACK, {"id": "f"})
    assert packed.headers["correlation-id"] == packed.correlation_id
    assert packed.correlation_id != as_json.correlation_id


async def test_duplicate_gets_the_first_reply_payload_under_its_own_correlation_id(
    settings, topics, producer, unique
):
    topic = await topics("rr-dup", partitions=1, extra=("dup-replies",))
    reply_topic = f"dup-replies-{unique}"
    calls: Counter[str] = Counter()
    app = _doubling_app(f"g-{unique}", settings, topic, calls)

    async with running(app), Requester(producer, reply_topic) as r:
        first = await r.request(
            topic, {"id": "k", "cents": 7}, content_type=CONTENT_JSON, timeout_s=60
        )
        # The same payload again, as msgpack this time: a duplicate (same key and hash).
        again = await r.request(
            topic, {"cents": 7, "id": "k"}, content_type=CONTENT_MSGPACK, timeout_s=60
        )

    assert calls == Counter({"k": 1})
    assert again.raw == first.raw  # the bytes of the first reply, not re-encoded for this copy
    assert again.content_type == first.content_type == CONTENT_JSON
    assert again.value == first.value == {"id": "k", "cents": 14}
    assert again.headers["idempotency-key"] == first.headers["idempotency-key"]
    # Each reply was matched by its own request's correlation id.
    assert again.correlation_id != first.correlation_id
    assert again.headers["correlation-id"] == again.correlation_id


@pytest.mark.parametrize("spelling", ["Application/JSON; charset=utf-8", "json", "text/json"])
async def test_a_json_request_spelled_with_parameters_or_an_alias_is_sent_as_json(
    settings, topics, producer, pg, unique, spelling
):
    # The worker reads these spellings as JSON (docs/codecs.md: content types match without
    # their parameters and case). The requester must then send JSON bytes under them: it sent
    # msgpack, which the worker dead-lettered as undecodable, and the request timed out.
    topic = await topics("rr-spell", partitions=1, extra=("spell-replies",))
    reply_topic = f"spell-replies-{unique}"
    calls: Counter[str] = Counter()
    app = _doubling_app(f"g-{unique}", settings, topic, calls)

    async with running(app), Requester(producer, reply_topic, content_type=spelling) as r:
        reply = await r.request(topic, {"id": "s", "cents": 4}, timeout_s=20)

    dead = await pg.fetchval("SELECT count(*) FROM dedup.outbox WHERE topic = $1", topic + ".dlq")
    assert (dead, calls) == (0, Counter({"s": 1}))
    assert (reply.content_type, reply.value) == (CONTENT_JSON, {"id": "s", "cents": 8})


async def test_a_request_nobody_answers_times_out_with_one_line(settings, topics, unique):
    topic = await topics("rr-none", partitions=1, extra=("none-replies",))
    async with Requester(settings.kafka_bootstrap, f"none-replies-{unique}") as r:
        with pytest.raises(RequestTimeout) as err:
            await r.request(topic, {"id": "z"}, timeout_s=0.5)
    message = str(err.value)
    assert "\n" not in message and "within 0.5 s" in message and topic in message


async def test_a_missing_reply_topic_is_refused_at_start(settings, unique):
    from consumer import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        async with Requester(settings.kafka_bootstrap, f"absent-{unique}"):
            pass


async def test_a_reply_to_the_apps_own_retry_topic_is_refused(
    settings, topics, producer, pg, unique
):
    # `<topic>.retry` of a retry="topics" handler is consumed by the app, as its sources are
    # (which replies are refused to): a reply there was read back as a retry of a message,
    # under the reply's own idempotency key (reply:<ns>:<key>), and the handler applied its
    # own result as a second message.
    topic = await topics("rr-loop", partitions=1)
    group = f"g-{unique}"
    table = f"rr_loop_{unique}"
    await pg.execute(f"CREATE TABLE {table} (k text)")
    app = App(group, settings=app_settings(settings))

    @app.handler(topic, schema=Pay, retry="topics")
    async def handle(p: Pay, ctx: Context) -> dict[str, Any]:
        await ctx.db.execute(f"INSERT INTO {table} VALUES ($1)", p.id)
        return {"id": p.id, "cents": p.cents}

    headers = {"idempotency-key": b"k1", "reply-to": f"{topic}.retry".encode()}
    try:
        async with running(app):
            await send(producer, topic, {"id": "a", "cents": 3}, headers=headers)
            await send(producer, topic, {"id": "b"}, headers={"idempotency-key": b"k2"})
            await wait_offset(pg, group, topic, 0, 2)
            replies = await outbox(pg, f"{topic}.retry")
            # Read back from <topic>.retry, it would be applied: give it the time to be.
            await asyncio.sleep(3 if replies else 0)
        effects = sorted(r["k"] for r in await pg.fetch(f"SELECT k FROM {table}"))
        assert (effects, replies) == (["a", "b"], [])
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {table}")
        await cleanup(pg, unique)


async def test_a_reply_the_requester_cannot_decode_does_not_burn_the_asking_handlers_key(
    settings, topics, producer, pg, unique
):
    # A handler asks another service (here a responder answering in text/plain, as a
    # FastStream handler returning a str does). The reply cannot be decoded: that is a
    # fault of the ask, not of the message being handled, so under on_error="retry" it is
    # retried, then dead-lettered `failed` with the key free. Requester raised DecodeError,
    # the class of an undecodable *consumed* record, which is definite: recorded `rejected`.
    topic = await topics("rr-ask", partitions=1, extra=("ask-svc", "ask-replies"))
    svc, reply_topic = f"ask-svc-{unique}", f"ask-replies-{unique}"
    group = f"g-{unique}"

    async def respond() -> None:
        consumer = AIOKafkaConsumer(
            svc,
            bootstrap_servers=settings.kafka_bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            async for rec in consumer:
                hdrs = dict(rec.headers)
                await producer.send_and_wait(
                    hdrs["reply-to"].decode(),
                    b"pong",
                    headers=[
                        ("content-type", b"text/plain"),
                        ("correlation-id", hdrs["correlation-id"]),
                    ],
                )
        finally:
            await consumer.stop()

    app = App(group, settings=app_settings(settings, max_attempts=2, retry_backoff_ms=1))
    responder = asyncio.create_task(respond())
    try:
        async with Requester(producer, reply_topic) as r:

            @app.handler(topic, schema=Pay, key=lambda p: p.id, name=f"ask-{unique}")
            async def ask(p: Pay, ctx: Context) -> Any:
                return (await r.request(svc, {"q": p.id}, timeout_s=20)).value

            async with running(app):
                await send(producer, topic, {"id": "a"})
                await wait_offset(pg, group, topic, 0, 1)
        recorded = await pg.fetch(
            "SELECT status FROM dedup.inbox WHERE namespace = $1", f"ask-{unique}"
        )
        [dead] = await outbox(pg, topic + ".dlq")
        assert ([r["status"] for r in recorded], dead["headers"]["x-reason"]) == ([], "failed")
    finally:
        responder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await responder
        await cleanup(pg, unique)


async def test_a_kafka_client_error_while_asking_never_burns_the_key_even_with_on_error_reject(
    settings, topics, pg, unique
):
    # A handler asks through a Requester and the Kafka client fails in a way it flags itself
    # as retriable (here the topic is not there yet: UnknownTopicOrPartitionError; as well
    # KafkaConnectionError, RequestTimedOutError, or its KafkaTimeoutError). Indefinite,
    # whatever on_error says (docs/guarantees.md, promise 3): nothing recorded, a `failed`
    # dead letter at the end. aiokafka's errors were not recognised (no *Timeout name, not
    # an OSError): unknown, and on_error="reject" recorded the key `rejected`.
    topic = await topics("rr-kto", partitions=1, extra=("kto-replies",))
    reply_topic = f"kto-replies-{unique}"
    group = f"g-{unique}"
    app = App(group, settings=app_settings(settings, max_attempts=2, retry_backoff_ms=1))
    quick = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=1000)
    await quick.start()
    try:
        async with Requester(quick, reply_topic) as r:

            @app.handler(
                topic, schema=Pay, key=lambda p: p.id, on_error="reject", name=f"kto-{unique}"
            )
            async def ask(p: Pay, ctx: Context) -> Any:
                return (await r.request(f"absent-{unique}", {"q": p.id}, timeout_s=20)).value

            async with running(app):
                await send(quick, topic, {"id": "a"})
                await wait_offset(pg, group, topic, 0, 1)
        recorded = await pg.fetch(
            "SELECT status FROM dedup.inbox WHERE namespace = $1", f"kto-{unique}"
        )
        [dead] = await outbox(pg, topic + ".dlq")
        assert ([r["status"] for r in recorded], dead["headers"]["x-reason"]) == ([], "failed")
        assert "UnknownTopicOrPartitionError" in dead["headers"]["x-detail"]
    finally:
        await quick.stop()
        await cleanup(pg, unique)


async def test_a_reply_too_large_for_the_relay_is_not_written_to_wait_forever(
    settings, topics, producer, pg, unique
):
    # A result can be far larger than a Kafka message (jsonb holds it). Its reply row was
    # written anyway: the relay's producer refused it on every tick (MessageSizeTooLarge),
    # held its key, and the row stayed pending for good, with every later reply of that
    # key behind it. Like a reply-to that cannot be answered, it is left out and logged;
    # the message itself is applied.
    topic = await topics("rr-big", partitions=1, extra=("big-replies",))
    reply_topic = f"big-replies-{unique}"
    group = f"g-{unique}"
    app = App(group, settings=app_settings(settings))

    @app.handler(topic, schema=Pay, key=lambda p: p.id, name=f"big-{unique}")
    async def big(p: Pay, ctx: Context) -> dict[str, str]:
        return {"blob": "x" * 1_100_000}

    try:
        async with running(app):
            await send(producer, topic, {"id": "a"}, headers={"reply-to": reply_topic.encode()})
            await wait_offset(pg, group, topic, 0, 1)
            await asyncio.sleep(1)  # a relay tick or two
        recorded = await pg.fetch(
            "SELECT status FROM dedup.inbox WHERE namespace = $1", f"big-{unique}"
        )
        pending = await pg.fetchval(
            "SELECT count(*) FROM dedup.outbox WHERE topic = $1 AND published_at IS NULL",
            reply_topic,
        )
        assert ([r["status"] for r in recorded], pending) == (["done"], 0)
    finally:
        await cleanup(pg, unique)
