"""The catalog sample (handlers/catalog/) as it is deployed: ``consumer run --workers 2``, the
real rates service (uvicorn), real Kafka, Redis and PostgreSQL, and a SIGKILL of the whole
process tree in the middle of the run.

The rates service holds its requests after the first ``HOLD_AFTER`` (its test hook): the run
is then stopped at a known point, some batches committed, others in flight with their HTTP
call waiting, and is killed there. A second run (the service released) finishes the work.
Every price and quote must then be applied exactly once (one row each, its inbox record
``done``), every one of them must have asked the service (the dependency was used), and the
resends (some Avro prices resent as JSON) must have changed nothing.

The test has its own database (orders_support.own_database), so only its relay publishes
its outbox rows and the counts are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from consumer import Settings
from consumer.codecs.avro import AvroCodec
from consumer.exitcodes import RET_OK, RET_STARTUP
from handlers.catalog import send
from handlers.catalog.app import MIGRATIONS, converted_topic, make_app, prices_topic, quotes_topic
from handlers.catalog.rates import RATES
from schemas.catalog import PriceInUsd
from scripts.orders_demo.processes import free_port
from scripts.toolkit import processes
from tests.conftest import create_topics, eventually, read_topic
from tests.integration.orders_support import PORTS, own_database

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

APP = "handlers.catalog.app:app"
N = 40  # prices, and as many quotes
RESEND = 12  # of each, sent again (half of the prices as JSON)
HOLD_AFTER = 30  # rate requests answered before the service holds the next ones
CENT = Decimal("0.01")


class Rates:
    """The rates service process (handlers/catalog/rates.py) and a client to it."""

    def __init__(self, url: str, client: httpx.AsyncClient) -> None:
        self.url, self.client = url, client

    async def calls(self) -> dict[str, Any]:
        answer: dict[str, Any] = (await self.client.get("/calls")).json()
        return answer


def _rates_argv(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "handlers.catalog.rates:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]


async def _serving(proc: subprocess.Popen[bytes], url: str, instance: str) -> bool:
    """True once ``url`` answers as ``instance`` (this process, not another session's server
    that took the port first); False if the process exited (the port was taken)."""
    async with httpx.AsyncClient(base_url=url, timeout=2) as client:
        for _ in range(300):
            if proc.poll() is not None:
                return False
            with contextlib.suppress(httpx.TransportError, ValueError):
                if (await client.get("/health")).json().get("instance") == instance:
                    return True
            await asyncio.sleep(0.1)
    raise AssertionError(f"the rates service did not come up at {url}")


@contextlib.asynccontextmanager
async def rates_service(env: dict[str, str], log: Path) -> AsyncIterator[Rates]:
    """The service on a free port of PORTS (bound by nobody when checked; if someone binds it
    before our server does, another port)."""
    first, _, last = PORTS.partition("-")
    instance = uuid.uuid4().hex
    for _ in range(5):
        port = free_port(int(first), int(last))
        proc = processes.spawn(_rates_argv(port), {**env, "RATES_INSTANCE": instance}, log)
        url = f"http://127.0.0.1:{port}"
        try:
            if await _serving(proc, url, instance):
                async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                    yield Rates(url, client)
                return
        finally:
            processes.kill_tree(proc)
            processes.reap(proc)
    raise AssertionError(f"no port of {PORTS} kept free for the rates service; see {log}")


@pytest.fixture
async def db(settings: Settings, unique: str) -> AsyncIterator[Settings]:
    async with own_database(settings, f"catalog_{unique}", {"catalog": MIGRATIONS}) as s:
        yield s


@pytest.fixture
async def prefix(db: Settings, unique: str) -> str:
    p = f"c{unique}."
    sources = [prices_topic(p), quotes_topic(p)]
    dead = [t + s for t in sources for s in (".dlq", ".conflicts")]
    await create_topics(db, [*sources, *dead, converted_topic(p)], 3)
    return p


def environment(db: Settings, prefix: str, rates_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "CONSUMER_POSTGRES_DSN": db.postgres_dsn,
        "CATALOG_TOPIC_PREFIX": prefix,
        "CATALOG_RATES_URL": rates_url,
        "CATALOG_HTTP_TIMEOUT_S": "30",  # a held request outlives the run it is killed in
        # A dead member's partitions and leases come free quickly in the second run.
        "CONSUMER_SESSION_TIMEOUT_MS": "6000",
        "CONSUMER_HEARTBEAT_INTERVAL_MS": "500",
        "CONSUMER_LEASE_MS": "2000",
        "CONSUMER_BATCH_MAX_RECORDS": "8",
        "CONSUMER_FETCH_TIMEOUT_MS": "100",
        "CONSUMER_SHUTDOWN_GRACE_S": "30",
        "PYTHONUNBUFFERED": "1",
    }


async def applied_keys(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT change_id AS k FROM catalog_prices UNION ALL SELECT quote_id FROM catalog_quotes"
    )
    return {r["k"] for r in rows}


async def counts(conn: asyncpg.Connection) -> tuple[int, int]:
    prices = await conn.fetchval("SELECT count(*) FROM catalog_prices")
    quotes = await conn.fetchval("SELECT count(*) FROM catalog_quotes")
    return int(prices), int(quotes)


async def test_two_workers_killed_mid_run_apply_every_price_and_quote_once(
    db: Settings, conn: asyncpg.Connection, prefix: str, unique: str, tmp_path: Path
) -> None:
    prices, quotes = send.prices(unique, N), send.quotes(unique, N)
    batch = send.records(prefix, prices, quotes, resend=RESEND, partitions=3)
    assert len(batch) == 2 * (N + RESEND)
    assert sum(r.content_type == "application/json" for r in batch) == N + RESEND + RESEND // 2
    keys = {p.change_id for p in prices} | {q.quote_id for q in quotes}
    app = make_app(prefix)
    namespaces = [h.name for h in app.handlers]
    log = tmp_path / "run.log"
    argv = processes.consumer_argv("run", APP, "--workers", "2")

    hold = {**os.environ, "RATES_TEST_HOLD_AFTER": str(HOLD_AFTER)}
    async with rates_service(hold, tmp_path / "rates.log") as rates:
        env = environment(db, prefix, rates.url)

        # Run 1: both workers in the group, then the records; until the service holds a
        # request and some rows have committed. Then SIGKILL the supervisor and both workers
        # at once (no drain, no shutdown hook).
        proc = processes.spawn(argv, env, log, header=True)
        try:
            await eventually(lambda: _stable_with(db, app.group, 2), timeout_s=60)
            await send.send(db.kafka_bootstrap, batch)

            async def stuck_mid_run() -> bool:
                return (await rates.calls())["held"] > 0 and sum(await counts(conn)) > 0

            await eventually(stuck_mid_run, timeout_s=90)
            workers = processes.children(proc.pid)
            assert len(workers) == 2, log.read_text()[-3000:]
        finally:
            processes.kill_tree(proc)
            processes.reap(proc)
        assert proc.returncode == -signal.SIGKILL
        await eventually(lambda: _true(not any(processes.alive(w) for w in workers)), 10)
        done_at_kill = await applied_keys(conn)
        assert 0 < len(done_at_kill) < 2 * N  # killed mid-run: some applied, the held ones not
        calls_at_kill: dict[str, int] = (await rates.calls())["by_request"]
        assert (await rates.client.post("/release")).status_code == 200

        # Run 2: finishes the work, then drains on SIGTERM (the shutdown hooks run).
        proc = processes.spawn(argv, env, log, header=True)
        try:

            async def all_done() -> bool:
                done = await conn.fetchval(
                    "SELECT count(*) FROM dedup.inbox WHERE namespace = ANY($1)"
                    " AND status = 'done'",
                    namespaces,
                )
                published = await conn.fetchval(
                    "SELECT count(*) FROM dedup.outbox WHERE topic = $1"
                    " AND published_at IS NOT NULL",
                    converted_topic(prefix),
                )
                return done == 2 * N and published == N

            await eventually(all_done, timeout_s=120)
            proc.send_signal(signal.SIGTERM)
            assert await processes.wait_exit(proc, 60) == RET_OK, log.read_text()[-3000:]
        finally:
            processes.kill_tree(proc)
            processes.reap(proc)
        calls = await rates.calls()

    text = log.read_text()
    run2 = text.rsplit("===== start", 1)[1]
    assert run2.count("catalog: rates client open on") == 2  # one client per worker process
    assert run2.count("catalog: rates client closed") == 2  # closed after each drain
    # LogContext: the handler's own lines carry the message's key and topic.
    logged = [line for line in run2.splitlines() if "handlers.catalog: price of" in line]
    assert logged, run2[-3000:]
    for line in logged:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        assert fields["key"] in keys and fields["topic"] == prices_topic(prefix), line
        assert fields["handler"] == namespaces[0] and {"partition", "offset"} <= set(fields)

    # Exactly once: one row per key, no other row, nothing dead-lettered.
    price_rows = await conn.fetch(
        "SELECT change_id, amount, currency, rate, usd FROM catalog_prices"
    )
    quote_rows = await conn.fetch(
        "SELECT quote_id, amount, currency, rate, usd FROM catalog_quotes"
    )
    applied = Counter([r["change_id"] for r in price_rows] + [r["quote_id"] for r in quote_rows])
    assert applied == Counter(keys)
    # Each amount converted at the rate the service gave for its currency.
    for r in [*price_rows, *quote_rows]:
        assert r["rate"] == RATES[r["currency"]]
        assert r["usd"] == (r["amount"] * RATES[r["currency"]]).quantize(CENT)
    inbox = await conn.fetch(
        "SELECT key, status FROM dedup.inbox WHERE namespace = ANY($1)", namespaces
    )
    assert {r["key"]: r["status"] for r in inbox} == dict.fromkeys(keys, "done")
    assert len(inbox) == 2 * N
    for topic in (prices_topic(prefix), quotes_topic(prefix)):
        assert await read_topic(db, topic + ".dlq") == []
        assert await read_topic(db, topic + ".conflicts") == []

    # The dependency was used: every key asked the rates service, nothing else did. A key
    # asks more than once only when its run was rolled back (the kill, a held request).
    asked: dict[str, int] = calls["by_request"]
    assert set(asked) == keys
    assert calls["total"] == sum(asked.values()) and calls["held"] == 0
    # A key applied before the kill is a duplicate afterwards: its handler never ran again.
    assert {k: asked[k] for k in done_at_kill} == {k: calls_at_kill[k] for k in done_at_kill}
    # The others (rolled back by the kill, or never reached) asked again in the second run.
    assert all(asked[k] > calls_at_kill.get(k, 0) for k in keys - done_at_kill)

    # One PriceInUsd outbox row per price (exactly); on the topic at least one copy of each
    # (a relay killed after the broker's ack sends its rows again: at-least-once publishing).
    rows = await conn.fetch(
        "SELECT idempotency_key FROM dedup.outbox WHERE topic = $1", converted_topic(prefix)
    )
    assert len(rows) == len({r["idempotency_key"] for r in rows}) == N
    events = await read_topic(db, converted_topic(prefix))
    avro = AvroCodec()
    decoded = [PriceInUsd.model_validate(avro.decode(e.value, PriceInUsd)) for e in events]
    assert {(e.change_id, e.usd) for e in decoded} == {
        (r["change_id"], r["usd"]) for r in price_rows
    }


async def test_the_rates_service_down_stops_a_worker_at_start(
    db: Settings, conn: asyncpg.Connection, prefix: str, tmp_path: Path
) -> None:
    first, _, last = PORTS.partition("-")
    url = f"http://127.0.0.1:{free_port(int(first), int(last))}"  # nothing listens there
    log = tmp_path / "worker.log"
    proc = processes.spawn(
        processes.consumer_argv("worker", APP, "--id", "0", "--no-relay"),
        environment(db, prefix, url),
        log,
    )
    try:
        code = await processes.wait_exit(proc, 60)
    finally:
        processes.kill_tree(proc)
        processes.reap(proc)
    text = log.read_text()
    assert code == RET_STARTUP, text[-3000:]
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1, text[-3000:]
    expected = (
        "worker 0: on_startup hook open_http raised ConnectionError:"
        f" the rates service at {url} does not answer"
    )
    assert expected in errors[0]
    assert "Traceback" not in text
    assert await counts(conn) == (0, 0)


async def _true(value: bool) -> bool:
    return value


async def _stable_with(settings: Settings, group: str, members: int) -> bool:
    """The consumer group is Stable with ``members`` members (every worker has partitions)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        [g] = (await admin.describe_consumer_groups([group]))[0].to_object()["groups"]
    finally:
        await admin.close()
    return bool(g["state"] == "Stable" and len(g["members"]) == members)
