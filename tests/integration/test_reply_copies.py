"""A copy that asks for a reply is answered even when an earlier copy in its batch did not ask.

Found by ``make demo``'s audit: when a key was already done (known from Redis) and the first
copy of it in a batch had no ``reply-to``, a later copy in the same batch that had one got
no answer, because the stored result was read only when the first copy asked.
"""

from __future__ import annotations

import pytest

from consumer import App, Context
from tests.conftest import app_settings, running
from tests.integration.dedup_support import Pay, outbox, send, wait_offset

pytestmark = pytest.mark.integration


async def test_later_copy_in_batch_gets_its_reply(settings, topics, producer, pg, unique):
    topic = await topics("replycopies", partitions=1, extra=("replies",))
    replies = f"replies-{unique}"
    group = f"g-{unique}"
    app = App(group, settings=app_settings(settings, relay_enabled=False))

    @app.handler(topic, schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> dict[str, int]:
        return {"cents": p.cents}

    # The key is applied and its done marker set in Redis; no reply asked.
    await send(producer, topic, {"id": "k", "cents": 5})
    async with running(app):
        await wait_offset(pg, group, topic, 0, 1)

    # With the worker stopped, two copies land together: one batch on restart. Only the
    # second copy asks for a reply.
    await send(producer, topic, {"id": "k", "cents": 5})
    await send(producer, topic, {"id": "k", "cents": 5}, headers={"reply-to": replies.encode()})
    async with running(app):
        await wait_offset(pg, group, topic, 0, 3)

    rows = await outbox(pg, replies)
    assert [r["idempotency_key"] for r in rows] == [f"reply:{group}.handle:k"]
    assert rows[0]["headers"]["x-source"] == f"{topic}/0/2"
