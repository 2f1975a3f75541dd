"""Topics the framework owns, against the real broker (auto-creation off, as in production).

The worker creates ``<source>.dlq`` and ``<source>.conflicts`` with the source's partition
count, refuses to start with one line when a source is missing, and, while Kafka cannot be
reached, says so itself and still stops at once on request.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from pydantic import BaseModel

from consumer import App, Context
from consumer.errors import TopicsMissing
from consumer.exitcodes import RET_OK, RET_TOPICS, of_error
from consumer.runtime.worker import Worker
from consumer.topics import check_code, create, inspect
from tests.conftest import app_settings, create_topics, eventually

pytestmark = pytest.mark.integration


class Order(BaseModel):
    n: int


async def _noop(p: Order, ctx: Context) -> None:
    return None


def _app(group: str, *sources: str, publishes: tuple[str, ...] = (), settings=None) -> App:
    app = App(group, settings=settings)
    app.handler(*sources, schema=Order, key="record", publishes=publishes)(_noop)
    return app


async def test_create_makes_the_owned_and_declared_topics_with_the_sources_partitions(
    settings, unique
):
    source, out = f"tp-{unique}", f"tp-out-{unique}"
    await create_topics(settings, [source], partitions=4)
    app = _app(f"g-{unique}", source, publishes=(out,))
    before = {st.need.topic: st for st in await inspect(app, settings)}
    assert [t for t, st in before.items() if st.exists] == [source]
    assert check_code(list(before.values())) == RET_TOPICS

    after = await create(app, settings)
    assert {st.need.topic: (st.need.role, st.partitions, st.created) for st in after} == {
        source: ("source", 4, False),
        source + ".dlq": ("dlq", 4, True),
        source + ".conflicts": ("conflicts", 4, True),
        out: ("publish", 4, True),
    }
    assert check_code(await inspect(app, settings)) == RET_OK
    again = await create(app, settings)  # nothing left to create
    assert not [st for st in again if st.created]


async def test_worker_creates_the_framework_topics_at_start(settings, unique, caplog):
    source = f"tw-{unique}"
    await create_topics(settings, [source], partitions=2)
    app = _app(f"g-{unique}", source, settings=app_settings(settings))
    caplog.set_level(logging.INFO, logger="consumer.topics")
    worker = Worker(app, app.settings)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(worker.started.wait(), 30)
    worker.stop.set()
    await asyncio.wait_for(task, 60)
    states = {st.need.topic: st.partitions for st in await inspect(app, settings)}
    assert states == {source: 2, source + ".dlq": 2, source + ".conflicts": 2}
    made = [r.getMessage() for r in caplog.records if "created the framework" in r.getMessage()]
    assert made == [f"created the framework's topics: {source}.dlq, {source}.conflicts"]


async def test_a_missing_source_topic_refuses_the_start_in_one_line(settings, unique, caplog):
    source = f"nosuch-{unique}"
    app = _app(f"g-{unique}", source, settings=app_settings(settings))
    caplog.set_level(logging.WARNING)
    with pytest.raises(TopicsMissing) as info:
        await Worker(app, app.settings).run()
    assert info.value.topics == [source]
    assert source in str(info.value) and "\n" not in str(info.value)
    assert of_error(info.value) == RET_TOPICS
    assert not [r for r in caplog.records if "not found in cluster metadata" in r.getMessage()]
    # Nothing was created for a source that does not exist.
    assert not [st for st in await inspect(app, settings) if st.exists]


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_worker_waiting_for_kafka_says_so_and_stops_on_request(settings, unique, caplog):
    away = settings.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{_unused_port()}"})
    app = _app(f"g-{unique}", f"t-{unique}", settings=app_settings(away))
    caplog.set_level(logging.WARNING)
    worker = Worker(app, app.settings)
    task = asyncio.create_task(worker.run())

    async def warned() -> bool:
        return any("unreachable" in r.getMessage() for r in caplog.records)

    await eventually(warned, timeout_s=30)
    worker.stop.set()  # what SIGTERM does
    await asyncio.wait_for(task, 10)  # returns: no consumer or lease was opened, no pool left open
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("aiokafka")]
    assert not [m for m in lines if m.startswith("Unable connect")]
    assert worker.consumer is None and worker.pool is None
