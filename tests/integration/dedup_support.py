"""Helpers shared by the outcome and fault tests: produce, observe outcomes, read the stores,
and drive a BatchProcessor directly on PostgreSQL (no Kafka) as the worker would.

Everything here reads the real stores (PostgreSQL rows, Redis keys) so a test asserts what
was committed, not what the runtime says it did.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgpack
from aiokafka import AIOKafkaProducer
from pydantic import BaseModel

from consumer import App, Settings
from consumer.constants import done_key, lease_key
from consumer.db.pool import create_pool
from consumer.dedup.leases import LeaseStore, NoLeases, RedisLeases
from consumer.message import Message
from consumer.runtime.batch import BatchProcessor, pg_transaction
from consumer.runtime.outcomes import BatchResult, Handled, Outcome
from consumer.runtime.worker import Worker
from tests.conftest import app_settings, eventually


class Pay(BaseModel):
    """The payload of these tests. ``sent_at`` is a transport detail (hash-excluded)."""

    id: str
    cents: int = 1
    sent_at: str = ""


async def send(
    producer: AIOKafkaProducer,
    topic: str,
    payload: dict[str, Any] | None = None,
    *,
    value: bytes | None = None,
    key: bytes | None = None,
    headers: dict[str, bytes] | None = None,
    partition: int = 0,
    as_json: bool = False,
) -> int:
    """Produce one record; returns its offset."""
    hdrs = dict(headers or {})
    if value is None:
        if as_json:
            value = json.dumps(payload).encode()
            hdrs.setdefault("content-type", b"application/json")
        else:
            value = msgpack.packb(payload)
    meta = await producer.send_and_wait(
        topic, value, key=key, headers=list(hdrs.items()), partition=partition
    )
    return int(meta.offset)


class Spy:
    """Records every Handled outcome of a running worker's batches."""

    def __init__(self, worker: Worker) -> None:
        assert worker.processor is not None
        self.handled: list[Handled] = []
        self.retries: list[str] = []
        processor = worker.processor
        original = processor.process

        async def spy(records: Any) -> Any:
            result = await original(records)
            self.handled.extend(result.handled)
            if result.retry_offset is not None:
                self.retries.append(result.error)
            return result

        processor.process = spy  # type: ignore[method-assign]

    def at(self, partition: int, offset: int) -> list[Outcome]:
        return [
            h.outcome
            for h in self.handled
            if h.message.partition == partition and h.message.offset == offset
        ]

    def outcomes(self) -> dict[tuple[int, int], list[Outcome]]:
        out: dict[tuple[int, int], list[Outcome]] = defaultdict(list)
        for h in self.handled:
            out[(h.message.partition, h.message.offset)].append(h.outcome)
        return dict(out)


async def stored_offset(pg: asyncpg.Connection, group: str, topic: str, partition: int) -> int:
    value = await pg.fetchval(
        "SELECT next_offset FROM dedup.offsets WHERE group_id=$1 AND topic=$2 AND partition=$3",
        group,
        topic,
        partition,
    )
    return -1 if value is None else int(value)


async def wait_offset(
    pg: asyncpg.Connection,
    group: str,
    topic: str,
    partition: int,
    next_offset: int,
    timeout_s: float = 30.0,
) -> None:
    """Wait until the stored position of a partition reaches ``next_offset``."""

    async def reached() -> bool:
        return await stored_offset(pg, group, topic, partition) >= next_offset

    await eventually(reached, timeout_s=timeout_s)


async def outbox(pg: asyncpg.Connection, topic: str) -> list[dict[str, Any]]:
    """Outbox rows for ``topic`` in id order, headers as a dict."""
    rows = await pg.fetch(
        "SELECT topic, key, value, headers, idempotency_key FROM dedup.outbox "
        "WHERE topic = $1 ORDER BY id",
        topic,
    )
    out = []
    for r in rows:
        headers = r["headers"]
        if isinstance(headers, str):
            headers = json.loads(headers)
        out.append(
            {
                "key": None if r["key"] is None else bytes(r["key"]),
                "value": bytes(r["value"]),
                "headers": {k: v for k, v in headers},
                "idempotency_key": r["idempotency_key"],
            }
        )
    return out


async def inbox(pg: asyncpg.Connection, namespace: str) -> dict[str, dict[str, Any]]:
    """Inbox rows of one namespace, by key, with ``result`` decoded from jsonb."""
    rows = await pg.fetch("SELECT * FROM dedup.inbox WHERE namespace = $1", namespace)
    out = {}
    for r in rows:
        row = dict(r)
        if isinstance(row["result"], str):
            row["result"] = json.loads(row["result"])
        out[r["key"]] = row
    return out


async def effects(pg: asyncpg.Connection, table: str) -> list[str]:
    return sorted(r[0] for r in await pg.fetch(f"SELECT k FROM {table}"))


async def cleanup(pg: asyncpg.Connection, unique: str, redis_url: str = "") -> None:
    """Delete one test's rows from the shared dedup tables (names carry ``unique``), and its
    Redis keys (by pattern: the Redis is shared, never flushed).

    Unpublished outbox rows would otherwise wait for whichever relay runs next, in any test.
    """
    if redis_url:
        leases = RedisLeases(redis_url)
        try:
            async for name in leases.redis.scan_iter(match=f"*{{*{unique}*}}*", count=20_000):
                await leases.redis.delete(name)
        finally:
            await leases.close()
    pattern = f"%{unique}%"
    await pg.execute("DELETE FROM dedup.outbox WHERE topic LIKE $1", pattern)
    await pg.execute("DELETE FROM dedup.inbox WHERE namespace LIKE $1", pattern)
    await pg.execute("DELETE FROM dedup.offsets WHERE group_id LIKE $1", pattern)


async def db_epoch(pg: asyncpg.Connection) -> str:
    """The database epoch a Worker puts in its done-marker keys."""
    return str(await pg.fetchval("SELECT value FROM dedup.meta WHERE name = 'epoch'") or "")


def redis_keys(namespace: str, keys: list[str], epoch: str) -> list[str]:
    """The lease and done-marker keys of ``keys``: deleted by name, since SCAN over the shared
    Redis (hundreds of thousands of keys) takes seconds."""
    return [name for k in keys for name in (lease_key(namespace, k), done_key(namespace, k, epoch))]


@contextlib.asynccontextmanager
async def direct_env(
    settings: Settings,
    pg: asyncpg.Connection,
    unique: str,
    prefix: str,
    *,
    pool_size: int = 2,
    app_name: str = "",
    clean_redis: bool = False,
    **setting_overrides: Any,
) -> AsyncIterator[dict[str, Any]]:
    """What a test driving BatchProcessor directly needs: ``settings`` (no relay, tiny retry
    backoffs, then ``setting_overrides``), ``group``, ``topic`` (``<prefix>-<unique>``), an
    asyncpg ``pool`` and its ``app_name``. The test's rows are deleted on exit, and its Redis
    keys too with ``clean_redis`` (a SCAN of the shared Redis: only for tests that use it).

    ``app_name`` sets the pool's application_name, which singles out this test's sessions in
    pg_stat_activity on the shared server.
    """
    s = app_settings(
        settings,
        relay_enabled=False,
        retry_backoff_ms=1,
        retry_backoff_max_ms=2,
        **setting_overrides,
    )
    dsn = settings.postgres_dsn
    if app_name:
        dsn += f"{'&' if '?' in dsn else '?'}application_name={app_name}"
    pool = await create_pool(dsn, max_size=pool_size)
    try:
        yield {
            "settings": s,
            "group": f"g-{unique}",
            "topic": f"{prefix}-{unique}",
            "pool": pool,
            "app_name": app_name,
        }
    finally:
        await pool.close()
        await cleanup(pg, unique, settings.redis_url if clean_redis else "")


def record(
    topic: str,
    offset: int,
    payload: dict[str, Any],
    *,
    partition: int = 0,
    headers: dict[str, bytes] | None = None,
) -> Message:
    """A consumed record as the worker would hand it over: msgpack value, no Kafka key."""
    hdrs = tuple((headers or {}).items())
    return Message(topic, partition, offset, None, msgpack.packb(payload), hdrs)


def direct_processor(
    app: App, env: dict[str, Any], leases: LeaseStore | None = None, token: str = "tok"
) -> BatchProcessor:
    """A BatchProcessor on ``env``'s pool; without Redis (``NoLeases``) unless ``leases``."""
    return BatchProcessor(
        app,
        env["settings"],
        NoLeases() if leases is None else leases,
        token,
        lambda: pg_transaction(env["pool"]),
    )


async def drive(processor: BatchProcessor, msgs: list[Message], rounds: int) -> list[BatchResult]:
    """Process ``msgs`` and redeliver from the retry position, as the worker does, at most
    ``rounds`` times in all; the result of every round, in order."""
    results = []
    pending = msgs
    for _ in range(rounds):
        result = await processor.process(pending)
        results.append(result)
        if result.retry_offset is None:
            break
        pending = [m for m in msgs if m.offset >= result.retry_offset]
    return results
