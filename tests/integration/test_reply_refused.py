"""A request cannot have its reply written into the framework's own topics.

``<topic>.retry``, ``<topic>.dlq`` and ``<topic>.conflicts`` are written by the framework only:
a reply injected into a retry topic is consumed as a retry of the source (run again, under
the source's namespace); one in a dead-letter topic is a forged dead letter that
``consumer replay`` re-drives. Whoever sends a request chooses its ``reply-to``, so a reply-to
named like a framework topic (this app's or any other's) gets no reply, as a reply-to this app
consumes gets none (consumer/runtime/replies.py). Real Kafka, Redis and PostgreSQL; the relay
is off, so the outbox rows are what the batch wrote.
"""

from __future__ import annotations

import pytest

from consumer import App, ConfigError, Context, Requester
from tests.conftest import app_settings, running
from tests.integration.dedup_support import Pay, inbox, outbox, send, wait_offset

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("header", "target"),
    [
        ("reply-to", "{topic}.retry"),  # this handler's own retry topic
        ("reply_to", "{topic}.retry"),  # FastStream's spelling
        ("reply-to", "elsewhere-{unique}.retry"),  # another app's retry topic
        ("reply-to", "elsewhere-{unique}.dlq"),
        ("reply-to", "elsewhere-{unique}.conflicts"),
        # Kafka's own (the broker refuses appends with InvalidTopicError, which the relay
        # takes for transient: the row would be sent again on every tick, forever).
        ("reply-to", "__consumer_offsets"),
        ("reply-to", "__transaction_state"),
    ],
)
async def test_a_reply_to_a_framework_topic_is_refused(
    settings, topics, producer, pg, unique, header, target
):
    topic = await topics("rrf", partitions=1, extra=("ok-replies",))
    bad = target.format(topic=topic, unique=unique)
    good = f"ok-replies-{unique}"
    group = f"g-{unique}"
    s = app_settings(settings, relay_enabled=False)
    app = App(group, settings=s)

    @app.handler(topic, schema=Pay, key=lambda p: p.id, retry="topics")
    async def handle(p: Pay, ctx: Context) -> dict[str, str]:
        return {"id": p.id}

    await send(producer, topic, {"id": "forged"}, headers={header: bad.encode()})
    await send(producer, topic, {"id": "fine"}, headers={header: good.encode()})
    async with running(app, s):
        await wait_offset(pg, group, topic, 0, 2)

    assert {k: r["status"] for k, r in (await inbox(pg, f"{group}.handle")).items()} == {
        "forged": "done",
        "fine": "done",
    }
    assert await outbox(pg, bad) == []  # no reply row into the framework's topic
    assert [r["idempotency_key"] for r in await outbox(pg, good)] == [f"reply:{group}.handle:fine"]


@pytest.mark.parametrize("name", ["{topic}.dlq", "__consumer_offsets"])
async def test_a_requester_waiting_on_a_framework_or_kafka_topic_is_refused(settings, topics, name):
    """Its replies would never come (refused above): one line at once, not a timeout later."""
    topic = await topics("rqf", partitions=1)  # both exist: only the name is wrong
    with pytest.raises(ConfigError, match=r"framework topic|Kafka internal topic") as err:
        async with Requester(settings.kafka_bootstrap, name.format(topic=topic)):
            pass
    assert "\n" not in str(err.value)


async def test_a_record_with_a_valueless_header_on_the_reply_topic_leaves_the_requester_working(
    settings, topics, producer, unique
):
    """Anyone can write to a reply topic; Kafka allows a header without a value (None in
    aiokafka). Such a record is not a reply: it is skipped, and the next reply still comes."""
    topic = await topics("rqn", partitions=1, extra=("rqn-replies",))
    replies = f"rqn-replies-{unique}"
    app = App(f"g-{unique}", settings=app_settings(settings))

    @app.handler(topic, schema=Pay, key=lambda p: p.id)
    async def echo(p: Pay, ctx: Context) -> dict[str, str]:
        return {"id": p.id}

    async with running(app), Requester(producer, replies) as r:
        await producer.send_and_wait(
            replies, b"noise", headers=[("correlation-id", None), ("x", None)]
        )
        reply = await r.request(topic, {"id": "after-noise"}, timeout_s=60)
    assert reply.value == {"id": "after-noise"}
