"""Records of aborted upstream Kafka transactions are never applied (issue 13, finding 7).

The worker reads with ``isolation_level="read_committed"`` (CONSUMER_KAFKA_ISOLATION_LEVEL).
Transaction markers take offsets of their own: the stored position after the last committed
record points at a control record, which must not read as "beyond the log end".
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from aiokafka import AIOKafkaProducer

from consumer import App, Context
from tests.conftest import app_settings, running
from tests.integration.dedup_support import Pay, cleanup, send, stored_offset, wait_offset

pytestmark = pytest.mark.integration

EFFECTS = "CREATE TABLE IF NOT EXISTS test_tx_effects (k text NOT NULL)"


async def _transaction(settings: Any, topic: str, ids: list[str], commit: bool, tid: str) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, transactional_id=tid, acks="all"
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        for i in ids:
            await producer.send_and_wait(topic, msgpack.packb({"id": i}), partition=0)
        if commit:
            await producer.commit_transaction()
        else:
            await producer.abort_transaction()
    finally:
        await producer.stop()


async def test_aborted_transactions_are_never_applied(settings, topics, producer, pg, unique):
    topic = await topics("tx", partitions=1)
    group = f"g-{unique}"
    await pg.execute(EFFECTS)
    app = App(group, settings=app_settings(settings, relay_enabled=False))

    @app.handler(topic, schema=Pay, key=lambda p: p.id)
    async def apply(p: Pay, ctx: Context) -> None:
        await ctx.db.execute("INSERT INTO test_tx_effects VALUES ($1)", p.id)

    tid = f"tx-{unique}"
    try:
        # offsets: 0,1 aborted + marker 2; 3,4 committed + marker 5; 6 aborted + marker 7;
        # 8 plain (outside any transaction).
        ab, ok = [f"ab{i}-{unique}" for i in range(3)], [f"ok{i}-{unique}" for i in range(2)]
        await _transaction(settings, topic, ab[:2], False, tid)
        await _transaction(settings, topic, ok, True, tid)
        await _transaction(settings, topic, ab[2:], False, tid)
        async with running(app):
            # After the last committed record, the stored position sits on a marker.
            await wait_offset(pg, group, topic, 0, 5)
        async with running(app) as worker:  # re-started at a marker: not "beyond log end"
            last = await send(producer, topic, {"id": f"plain-{unique}"})
            await wait_offset(pg, group, topic, 0, last + 1)
            assert getattr(worker, "halted", {}) == {}
        rows = await pg.fetch("SELECT k FROM test_tx_effects WHERE k LIKE $1", f"%{unique}")
        assert sorted(r[0] for r in rows) == sorted(
            [f"ok0-{unique}", f"ok1-{unique}", f"plain-{unique}"]
        )
        assert await stored_offset(pg, group, topic, 0) == last + 1
    finally:
        await pg.execute("DELETE FROM test_tx_effects WHERE k LIKE $1", f"%{unique}")
        await cleanup(pg, unique)


def test_isolation_level_setting(monkeypatch):
    from consumer.settings import load_settings

    assert load_settings().kafka_isolation_level == "read_committed"
    monkeypatch.setenv("CONSUMER_KAFKA_ISOLATION_LEVEL", "read_uncommitted")
    assert load_settings().kafka_isolation_level == "read_uncommitted"
