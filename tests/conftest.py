"""Shared fixtures. Integration tests use the real services named in ``.env``.

Where a service does not answer, integration tests skip with a clear message on a laptop and
**fail** when ``CI=true``: a skipped guarantee is not a proven one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from consumer import App, ConfigError, Settings, load_settings
from consumer.db.migrate import migrate_dsn
from consumer.runtime.worker import Worker
from consumer.telemetry import standard_observers
from scripts.toolkit import topics as toolkit_topics
from tests import services_containers
from tests.services_containers import pytest_addoption, pytest_unconfigure  # noqa: F401 (hooks)

ROOT = Path(__file__).resolve().parent.parent
APP_MIGRATIONS = {"payments": ROOT / "handlers" / "migrations"}  # as handlers/app.py


def _load_dotenv() -> None:
    env = ROOT / ".env"
    if not env.exists():
        return
    for line in env.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            os.environ.setdefault(name.strip(), value.strip())


_load_dotenv()


def pytest_configure(config: pytest.Config) -> None:
    """Warnings are errors here, leaks included, with one exception: an AIOKafkaConnection
    that aiokafka itself opened while its client was stopping and never closed (known races:
    aio-libs/aiokafka#715, #1019), reported when the garbage collector finds it during a
    later test. Only that object and its socket *to the Kafka port* are ignored; a leaked
    connection to Redis or PostgreSQL still fails the test that meets it.

    With ``--services=containers`` the services are started first (tests/services_containers.py)."""
    services_containers.configure(config)
    port = os.environ.get("CONSUMER_KAFKA_BOOTSTRAP", "127.0.0.1:19092").rpartition(":")[2]
    for pattern in (
        r"Exception ignored in. <function AIOKafkaConnection.__del__",
        r"Exception ignored in. <function StreamWriter.__del__",
        r"Exception ignored in. <function _SelectorTransport.__del__",
        r"Exception ignored in. <socket.socket fd=\d+, family=\d+, type=\d+, proto=\d+, "
        rf"laddr=\('127.0.0.1', \d+\), raddr=\('127.0.0.1', {port}\)>",
    ):
        config.addinivalue_line(
            "filterwarnings", f"ignore:{pattern}:pytest.PytestUnraisableExceptionWarning"
        )


def _answers(hostport: str) -> bool:
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1):
            return True
    except OSError:
        return False


def _hostport(url: str) -> str:
    rest = url.split("://", 1)[-1].split("@")[-1]
    return rest.split("/")[0]


@pytest.fixture(scope="session")
def settings() -> Settings:
    try:
        s = load_settings()
    except ConfigError as exc:  # no .env: the connection settings have no default
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {exc}", pytrace=False)
        pytest.skip(f"{exc}; run `make services`")
    missing = [
        name
        for name, hp in (
            ("Kafka", s.kafka_bootstrap.split(",")[0]),
            ("Redis", _hostport(s.redis_url)),
            ("PostgreSQL", _hostport(s.postgres_dsn)),
        )
        if not _answers(hp)
    ]
    if missing:
        msg = f"{', '.join(missing)} not answering; run `make services` (settings from .env)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and {msg}", pytrace=False)
        pytest.skip(msg)
    asyncio.run(migrate_dsn(s.postgres_dsn, APP_MIGRATIONS))
    return s


async def _admin(settings: Settings, sql: str) -> None:
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def fresh_dsn(settings: Settings, unique: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An empty database of this test (no migrations); CONSUMER_POSTGRES_DSN points at it.

    A sync fixture, so sync tests that run the CLI in-process (its own event loop) can use it.
    """
    name = f"scratch_{unique}"
    asyncio.run(_admin(settings, f'CREATE DATABASE "{name}"'))
    dsn = urlunsplit(urlsplit(settings.postgres_dsn)._replace(path=f"/{name}"))
    monkeypatch.setenv("CONSUMER_POSTGRES_DSN", dsn)
    try:
        yield dsn
    finally:
        asyncio.run(_admin(settings, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic, group and key names of one test."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def pg(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def create_topics(settings: Settings, names: list[str], partitions: int = 3) -> None:
    await toolkit_topics.create_topics(settings.kafka_bootstrap, dict.fromkeys(names, partitions))


@pytest.fixture
async def topics(settings: Settings, unique: str) -> Callable[..., Awaitable[str]]:
    """``await topics("name", partitions=3)`` creates ``name-<unique>`` with .dlq/.conflicts."""

    async def make(base: str = "t", partitions: int = 3, extra: tuple[str, ...] = ()) -> str:
        name = f"{base}-{unique}"
        await create_topics(
            settings,
            [name, name + ".dlq", name + ".conflicts", *(f"{e}-{unique}" for e in extra)],
            partitions,
        )
        return name

    return make


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


def app_settings(settings: Settings, **overrides: Any) -> Settings:
    base: dict[str, Any] = {"status_interval_s": 60.0, "fetch_timeout_ms": 50}
    base.update(overrides)
    return settings.model_copy(update=base)


@contextlib.asynccontextmanager
async def running(
    app: App, settings: Settings | None = None, worker_id: int = 0
) -> AsyncIterator[Worker]:
    """Run a Worker in this event loop; stop and drain it on exit."""
    s = settings or app.settings
    observer = standard_observers(s.hash_keys_in_logs)
    worker = Worker(app, s, worker_id, observer=observer)
    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.started.wait(), 30)
        yield worker
    finally:
        worker.stop.set()
        await asyncio.wait_for(task, 60)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 30.0, every_s: float = 0.1
) -> None:
    """Poll ``check`` until it is true; fail with the timeout otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        if await check():
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(every_s)


async def read_topic(settings: Settings, topic: str, expect: int | None = None) -> list[Any]:
    """The records of ``topic`` from the beginning, per partition in offset order.

    Without ``expect``: everything up to the end offsets as they are now. With ``expect``:
    wait (bounded, 60 s) until that many records have arrived, e.g. while a relay publishes.
    """
    return await toolkit_topics.read_topic(settings.kafka_bootstrap, topic, expect, timeout_s=60)


def header_map(record: Any) -> dict[str, str]:
    """A consumed record's headers as text."""
    return {k: v.decode() for k, v in record.headers}
