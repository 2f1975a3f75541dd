"""The ``driver`` fixture: each contract scenario runs on every backend.

``memory`` needs no service; ``postgres`` (the harness on real PostgreSQL) and ``runtime``
(a real Worker on Kafka, Redis and PostgreSQL) are integration tests.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from consumer import Settings
from consumer.testing import TestApp
from tests.conftest import app_settings
from tests.contract.drivers import Driver, HarnessDriver, RuntimeDriver
from tests.contract.subject import Kind, make_app

BACKENDS = [
    "memory",
    pytest.param("postgres", marks=pytest.mark.integration),
    pytest.param("runtime", marks=pytest.mark.integration),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def services(backend: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Real services only for the backends that use them (the memory one runs anywhere)."""
    if backend == "memory":
        return {"settings": Settings()}
    found: dict[str, Any] = {"settings": request.getfixturevalue("settings")}
    if backend == "runtime":
        found["topics"] = request.getfixturevalue("topics")
        found["producer"] = request.getfixturevalue("producer")
    return found


@pytest.fixture(params=["handler", "batch"])
def kind(request: pytest.FixtureRequest) -> Kind:
    """Each scenario with a per-message handler and with the same handler as a batch one."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def driver(
    backend: str, services: dict[str, Any], unique: str, kind: Kind
) -> AsyncIterator[Driver]:
    async with _driver(backend, services, unique, kind) as d:
        yield d


@pytest.fixture
async def batch_driver(
    backend: str, services: dict[str, Any], unique: str
) -> AsyncIterator[Driver]:
    """The batch-handler subject only: for scenarios with several records in one batch."""
    async with _driver(backend, services, unique, "batch") as d:
        yield d


@contextlib.asynccontextmanager
async def _driver(
    backend: str, services: dict[str, Any], unique: str, kind: Kind
) -> AsyncIterator[Driver]:
    calls: Counter[str] = Counter()
    group = f"contract-{unique}"
    if backend == "runtime":
        topic = await services["topics"]("contract", extra=("contract-out",))
        out = f"contract-out-{unique}"
        # A crashed worker's lease outlives it by lease_ms: keep that short so the takeover
        # (which waits up to lease_wait_ms for it) is quick. The contract observes outbox rows,
        # not the relay (tested on its own), which on a shared database may be busy with other
        # tests' rows and slow the worker's shutdown.
        settings = app_settings(
            services["settings"], lease_ms=1000, retry_backoff_ms=50, relay_enabled=False
        )
        runtime = RuntimeDriver(
            make_app(group, topic, out, calls, settings, kind),
            settings,
            services["producer"],
            topic,
            out,
            calls,
        )
        await runtime.start()
        try:
            yield runtime
        finally:
            await runtime.close()
        return
    topic, out = f"contract-{unique}", f"contract-out-{unique}"
    settings = services["settings"]
    app = make_app(group, topic, out, calls, settings, kind)
    db = settings.postgres_dsn if backend == "postgres" else None
    async with TestApp(app, db=db) as t:
        yield HarnessDriver(t, topic, out, calls)
