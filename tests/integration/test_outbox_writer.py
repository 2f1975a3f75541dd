"""``consumer.Outbox``: outbox rows written in the caller's own transaction, against PostgreSQL.

Each test has its own database (tests/integration/orders_support.py), so the rows read back
are exactly the ones it wrote.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import msgpack
import psycopg
import pytest

from consumer import Outbox, OutboxError, Settings
from consumer.constants import CONTENT_JSON, CONTENT_MSGPACK, NOTIFY_CHANNEL
from consumer.context import outgoing
from consumer.message import Message
from consumer.outbox import envelopes, store
from schemas.orders import OrderCreated
from tests.integration.orders_support import own_database

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOPIC = "orders.created"


@pytest.fixture
async def db(settings: Settings, unique: str) -> AsyncIterator[Settings]:
    async with own_database(settings, f"writer_{unique}") as s:
        yield s


async def outbox_rows(conn: Any) -> list[Any]:
    return list(
        await conn.fetch(
            "SELECT id, topic, key, value, headers, shard, idempotency_key, published_at"
            " FROM dedup.outbox ORDER BY id"
        )
    )


def headers_of(row: Any) -> list[tuple[str, str]]:
    return [tuple(pair) for pair in json.loads(row["headers"])]


def created(order_id: str) -> OrderCreated:
    return OrderCreated(order_id=order_id, customer="ada", cents=1200)


async def test_publish_writes_a_handlers_envelope_and_commits_with_the_transaction(
    conn: asyncpg.Connection, db: Settings
) -> None:
    other = await asyncpg.connect(db.postgres_dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO orders (order_id, customer, cents) VALUES ('o-1', 'ada', 1200)"
            )
            ik = await Outbox(conn, source="orders-api").publish(
                TOPIC,
                created("o-1"),
                key="o-1",
                idempotency_key="o-1",
                # A caller's own value for a derived header is replaced, as for ctx.publish.
                headers={"tenant": "t1", "idempotency-key": "forged", "x-source": "forged"},
            )
            assert await outbox_rows(other) == [], "visible before the commit"
    finally:
        await other.close()
    assert ik == "orders-api:o-1"
    [row] = await outbox_rows(conn)
    assert (row["topic"], row["key"], row["idempotency_key"]) == (TOPIC, b"o-1", ik)
    assert row["published_at"] is None and row["shard"] == store.shard_of(TOPIC, b"o-1")
    assert headers_of(row) == [
        ("tenant", "t1"),
        ("content-type", CONTENT_MSGPACK),
        ("idempotency-key", "orders-api:o-1"),
        ("x-source", "orders-api"),
    ]
    # Byte for byte the row a handler's ctx.publish of the same payload gets, but for the
    # derived idempotency key and x-source.
    item = outgoing(TOPIC, created("o-1"), key="o-1", headers={"tenant": "t1"})
    msg = Message("in", 0, 5, None, b"", (), 0)
    [handlers] = envelopes.published(msg, "ship", "k", [item])
    assert bytes(row["value"]) == handlers.value
    assert msgpack.unpackb(row["value"]) == created("o-1").model_dump()
    assert [n for n, _ in headers_of(row)] == [n for n, _ in handlers.headers]


async def test_rows_keep_call_order_and_roll_back_with_the_transaction(
    conn: asyncpg.Connection,
) -> None:
    async with conn.transaction():
        outbox = Outbox(conn, source="orders-api")
        for seq in range(5):
            await outbox.publish(TOPIC, {"seq": seq}, key="k", idempotency_key=f"k-{seq}")
    with pytest.raises(RuntimeError, match="the save failed"):
        async with conn.transaction():
            await Outbox(conn, source="orders-api").publish(TOPIC, {"seq": 99}, key="k")
            raise RuntimeError("the save failed")
    rows = await outbox_rows(conn)
    assert [msgpack.unpackb(r["value"])["seq"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["idempotency_key"] for r in rows] == [f"orders-api:k-{s}" for s in range(5)]


async def test_outside_a_transaction_it_refuses_and_writes_nothing(
    conn: asyncpg.Connection,
) -> None:
    with pytest.raises(OutboxError, match=r"needs an open transaction"):
        await Outbox(conn, source="orders-api").publish(TOPIC, created("o-2"))
    with pytest.raises(OutboxError, match=r"asyncpg connection or a psycopg AsyncConnection"):
        Outbox(object(), source="orders-api")
    assert await outbox_rows(conn) == []


async def test_bad_input_is_refused_before_anything_is_written(conn: asyncpg.Connection) -> None:
    with pytest.raises(ValueError, match="source"):
        Outbox(conn, source="reply")  # reserved: it opens replies' keys
    async with conn.transaction():
        outbox = Outbox(conn, source="orders-api")
        with pytest.raises(ValueError, match="not a valid Kafka topic"):
            await outbox.publish("bad topic!", created("o-3"))
        with pytest.raises(ValueError, match="Kafka internal topic"):  # resent forever before
            await outbox.publish("__consumer_offsets", created("o-3"))
        with pytest.raises(ValueError, match="content_type"):
            await outbox.publish(TOPIC, created("o-3"), content_type="text/xml")
        with pytest.raises(ValueError, match="NUL"):
            await outbox.publish(TOPIC, created("o-3"), headers={"note": "a\x00b"})
        with pytest.raises(ValueError, match="more than the relay can send"):
            await outbox.publish(TOPIC, {"blob": "x" * envelopes.MAX_ROW_BYTES})
        # The transaction is still usable: nothing failed inside PostgreSQL.
        await outbox.publish(TOPIC, created("o-3"), content_type=CONTENT_JSON)
    [row] = await outbox_rows(conn)
    assert json.loads(bytes(row["value"])) == created("o-3").model_dump()
    # Without an idempotency key: a fresh one per message, still scoped by the source.
    assert re.fullmatch(r"orders-api:[0-9a-f]{32}", row["idempotency_key"])


async def test_the_relay_channel_is_notified_on_commit_only(
    conn: asyncpg.Connection, db: Settings
) -> None:
    listener = await asyncpg.connect(db.postgres_dsn)
    heard = asyncio.Event()
    await listener.add_listener(NOTIFY_CHANNEL, lambda *_: heard.set())
    try:
        async with conn.transaction():
            await Outbox(conn, source="orders-api").publish(TOPIC, created("o-4"))
            await listener.fetchval("SELECT 1")  # a round trip: anything sent has arrived
            assert not heard.is_set(), "notified before the commit"
        await asyncio.wait_for(heard.wait(), 10)
    finally:
        await listener.close()


async def test_psycopg_async_connection(conn: asyncpg.Connection, db: Settings) -> None:
    listener = await asyncpg.connect(db.postgres_dsn)
    heard = asyncio.Event()
    await listener.add_listener(NOTIFY_CHANNEL, lambda *_: heard.set())
    try:
        async with await psycopg.AsyncConnection.connect(db.postgres_dsn) as pc:
            with pytest.raises(OutboxError, match="needs an open transaction"):
                await Outbox(pc, source="orders-api").publish(TOPIC, created("p-0"))
            async with pc.transaction():
                await pc.execute(
                    "INSERT INTO orders (order_id, customer, cents) VALUES ('p-1', 'ada', 1200)"
                )
                outbox = Outbox(pc, source="orders-api")
                await outbox.publish(TOPIC, created("p-1"), key="p-1", idempotency_key="p-1")
                await outbox.publish(TOPIC, created("p-2"), idempotency_key="p-2")  # no key
                await listener.fetchval("SELECT 1")
                assert not heard.is_set()
            await asyncio.wait_for(heard.wait(), 10)
        async with await psycopg.AsyncConnection.connect(db.postgres_dsn, autocommit=True) as pc:
            with pytest.raises(OutboxError):  # autocommit, no transaction block: refused
                await Outbox(pc, source="orders-api").publish(TOPIC, created("p-3"))
    finally:
        await listener.close()
    rows = await outbox_rows(conn)
    assert [(r["key"], r["idempotency_key"]) for r in rows] == [
        (b"p-1", "orders-api:p-1"),
        (None, "orders-api:p-2"),
    ]
    assert headers_of(rows[0]) == [
        ("content-type", CONTENT_MSGPACK),
        ("idempotency-key", "orders-api:p-1"),
        ("x-source", "orders-api"),
    ]
    assert bytes(rows[0]["value"]) == outgoing(TOPIC, created("p-1")).value
    assert await conn.fetchval("SELECT count(*) FROM orders WHERE order_id = 'p-1'") == 1


def doc_example() -> str:
    text = (ROOT / "docs" / "outbox.md").read_text()
    found = re.search(r"<!-- example: outbox-writer .*?-->\n```python\n(.*?)```", text, re.S)
    assert found, "docs/outbox.md lost its outbox-writer example"
    return found.group(1)


async def test_the_docs_example_saves_the_order_and_its_event(
    conn: asyncpg.Connection, db: Settings
) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(doc_example(), "docs/outbox.md", "exec"), namespace)
    pool = await asyncpg.create_pool(db.postgres_dsn, min_size=1, max_size=2)
    try:
        ik = await namespace["place_order"](pool, "doc-1", "ada", 1200)
    finally:
        await pool.close()
    assert ik == "orders-api:doc-1"
    assert await conn.fetchval("SELECT cents FROM orders WHERE order_id = 'doc-1'") == 1200
    [row] = await outbox_rows(conn)
    assert (row["topic"], row["key"], row["idempotency_key"]) == ("order.created", b"doc-1", ik)


async def test_an_unusable_idempotency_key_is_refused_and_the_transaction_stays_usable(
    conn: asyncpg.Connection,
) -> None:
    # An empty key (a client's missing Idempotency-Key read as "") silently became a fresh
    # UUID: every retry of the request published another event, which a downstream
    # consumer applied again. A NUL failed inside PostgreSQL (text and jsonb refuse it),
    # aborting the caller's transaction with its order. Both are refused first, as the
    # documented bad input is: ValueError, nothing written, the transaction intact.
    async with conn.transaction():
        outbox = Outbox(conn, source="orders-api")
        for bad in ("", "o-\x004"):
            with pytest.raises(ValueError, match="idempotency_key"):
                await outbox.publish(TOPIC, created("o-4"), idempotency_key=bad)
        await outbox.publish(TOPIC, created("o-4"), idempotency_key="o-4")
    assert [r["idempotency_key"] for r in await outbox_rows(conn)] == ["orders-api:o-4"]
