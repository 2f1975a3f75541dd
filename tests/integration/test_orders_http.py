"""The HTTP + outbox example end to end: a real uvicorn process hit by a real httpx client,
``consumer relay`` as its own process, and the ledger worker (handlers/orders/).

Each test has its own database (so only its relay publishes its rows and copy counts are
exact) and its own topic. The audit is the demo's (scripts/orders_demo/audit.py): every
order announced and shipped exactly once, no event without its order.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from rich.console import Console

from consumer import Settings
from handlers.orders.ledger import created_topic, make_app
from handlers.orders.web import APPLICATION_NAME
from scripts.orders_demo.audit import OrdersAudit, audit_orders
from scripts.toolkit import processes
from tests.conftest import create_topics, eventually, header_map, read_topic, running
from tests.integration.orders_support import environment, own_database, pending, relay, web_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
async def db(settings: Settings, unique: str) -> AsyncIterator[Settings]:
    async with own_database(settings, f"orders_{unique}") as s:
        yield s


@pytest.fixture
async def prefix(db: Settings, unique: str) -> str:
    """The deployment's prefix; its order.created topic (with .dlq, .conflicts) exists."""
    p = f"o{unique}."
    topic = created_topic(p)
    await create_topics(db, [topic, topic + ".dlq", topic + ".conflicts"])
    return p


def orders(run: str, n: int) -> list[dict[str, Any]]:
    return [{"order_id": f"{run}-{i}", "customer": f"c{i % 5}", "cents": 100 + i} for i in range(n)]


async def post_all(client: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> list[int]:
    """POST every order at once; the status codes in order."""
    answers = await asyncio.gather(*(client.post("/orders", json=b) for b in bodies))
    return [a.status_code for a in answers]


async def settled(conn: asyncpg.Connection, worker: Any, copies: int) -> None:
    """Until the outbox is empty and the worker has consumed ``copies`` records."""

    async def done() -> bool:
        return await pending(conn) == 0 and worker.stats.consumed >= copies

    await eventually(done, timeout_s=90)


def explain(audit: OrdersAudit) -> str:
    console = Console(width=120, record=True)
    with console.capture():
        console.print(audit.table())
    return console.export_text()


async def test_orders_posted_concurrently_are_each_applied_once(
    db: Settings, conn: asyncpg.Connection, prefix: str, unique: str, tmp_path: Path
) -> None:
    n = 30
    bodies = orders(unique, n)
    # Polling once every 10 minutes: the events move because the commits NOTIFY the relay.
    env = environment(db, prefix, CONSUMER_RELAY_POLL_MS="600000")
    async with (
        relay(env, tmp_path / "relay.log") as relay_proc,
        running(make_app(prefix, settings=db)) as worker,
        web_server(env, tmp_path / "web.log") as web,
        httpx.AsyncClient(base_url=web.url) as client,
    ):
        assert await post_all(client, bodies) == [201] * n
        # Resends: the same body creates nothing; another body under the same id is refused.
        assert await post_all(client, bodies[:5]) == [200] * 5
        clash = {**bodies[0], "cents": 1}
        assert (await client.post("/orders", json=clash)).status_code == 409
        assert (await client.post("/orders", json={"order_id": ""})).status_code == 422
        await settled(conn, worker, n)
    assert relay_proc.returncode == 0, (tmp_path / "relay.log").read_text()
    records = await read_topic(db, created_topic(prefix))
    assert len(records) == n  # one relay, no crash: one copy each
    for r in records:
        h = header_map(r)
        assert h["x-source"] == "orders-api" and h["content-type"] == "application/msgpack"
    audit = await audit_orders(conn, records, unique)
    assert audit.ok and audit.orders == n, explain(audit)
    assert (worker.stats.by_outcome["applied"], worker.stats.by_outcome["duplicate"]) == (n, 0)


async def test_relay_killed_after_the_ack_resends_and_each_order_is_applied_once(
    db: Settings, conn: asyncpg.Connection, prefix: str, unique: str, tmp_path: Path
) -> None:
    n = 24
    env = environment(db, prefix)
    async with (
        web_server(env, tmp_path / "web.log") as web,
        httpx.AsyncClient(base_url=web.url) as client,
    ):
        assert await post_all(client, orders(unique, n)) == [201] * n
    assert await pending(conn) == n

    # The relay dies (exit 137, no clean-up) right after the broker acked its first tick's
    # rows and before it marked them: the window that makes copies.
    log = tmp_path / "relay.log"
    async with relay(env, log, faults="relay_after_ack=1") as doomed:
        assert await processes.wait_exit(doomed, 60) == 137, log.read_text()
    assert "consumer fault point relay_after_ack: exiting with 137" in log.read_text()
    assert await pending(conn) == n, "rows were marked although the relay died before marking"
    sent_before = len(await read_topic(db, created_topic(prefix)))
    assert 0 < sent_before <= n

    async with relay(env, log) as again, running(make_app(prefix, settings=db)) as worker:
        await settled(conn, worker, n + sent_before)
    assert again.returncode == 0, log.read_text()
    records = await read_topic(db, created_topic(prefix))
    assert len(records) == n + sent_before
    copies = Counter(header_map(r)["idempotency-key"] for r in records)
    assert sorted(copies.values()) == [1] * (n - sent_before) + [2] * sent_before
    audit = await audit_orders(conn, records, unique)
    assert audit.ok and audit.orders == n, explain(audit)
    assert (worker.stats.by_outcome["applied"], worker.stats.by_outcome["duplicate"]) == (
        n,
        sent_before,
    )


def said(log: Path, text: str) -> bool:
    return text in log.read_text()


async def open_request_transactions(conn: asyncpg.Connection, state: str | None = None) -> int:
    """The server's connections to this database (in ``state``, if given)."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = $1 AND ($2::text IS NULL OR state = $2)",
            APPLICATION_NAME,
            state,
        )
    )


async def test_server_killed_mid_request_leaves_no_order_without_its_event_nor_the_reverse(
    db: Settings, conn: asyncpg.Connection, prefix: str, unique: str, tmp_path: Path
) -> None:
    n = 10
    bodies = orders(unique, n)
    held = {"order_id": f"{unique}-held", "customer": "zed", "cents": 999}
    hold_env = environment(db, prefix, ORDERS_TEST_HOLD_BEFORE_COMMIT=held["order_id"])
    async with (
        relay(environment(db, prefix), tmp_path / "relay.log"),
        running(make_app(prefix, settings=db)) as worker,
    ):
        async with (
            web_server(hold_env, tmp_path / "web.log") as web,
            httpx.AsyncClient(base_url=web.url, timeout=None) as client,
        ):
            assert await post_all(client, bodies) == [201] * n
            request = asyncio.create_task(client.post("/orders", json=held))

            # Its order and outbox rows written (the server says so after both), the
            # transaction open and waiting.
            async def holding() -> bool:
                return said(web.log, f"holding order {held['order_id']} before its commit") and (
                    await open_request_transactions(conn, "idle in transaction") == 1
                )

            await eventually(holding)
            os.kill(web.proc.pid, signal.SIGKILL)
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                await request
            assert web.proc.wait(10) == -signal.SIGKILL

        # PostgreSQL saw the connections close and rolled the open transaction back.
        async def gone() -> bool:
            return await open_request_transactions(conn) == 0

        await eventually(gone)
        assert (
            await conn.fetchval("SELECT count(*) FROM orders WHERE order_id = $1", held["order_id"])
            == 0
        )
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM dedup.outbox WHERE idempotency_key = $1",
                f"orders-api:{held['order_id']}",
            )
            == 0
        )

        # The client retries against the restarted server: the order is created now, once;
        # a resend of one that committed before creates nothing.
        async with (
            web_server(environment(db, prefix), tmp_path / "web.log") as web,
            httpx.AsyncClient(base_url=web.url) as client,
        ):
            assert (await client.post("/orders", json=held)).status_code == 201
            assert (await client.post("/orders", json=bodies[0])).status_code == 200
        await settled(conn, worker, n + 1)
    records = await read_topic(db, created_topic(prefix))
    assert len(records) == n + 1
    audit = await audit_orders(conn, records, unique)
    assert audit.ok and audit.orders == n + 1, explain(audit)
    assert worker.stats.by_outcome["applied"] == n + 1
