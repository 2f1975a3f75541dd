"""Review of issue 15's migration 0005 against a database with records in it and a worker's
transaction open while it applies (retention by first_seen_at, HOT completion)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from consumer.db import migrate
from consumer.dedup import inbox

pytestmark = pytest.mark.integration


def _files(upto: int) -> list[str]:
    return [
        migrate._text(p)
        for p in sorted(migrate.FRAMEWORK_DIR.glob("*.sql"))
        if int(p.name[:4]) <= upto
    ]


async def test_0005_applies_under_a_running_batch_and_retention_keeps_what_is_needed(fresh_dsn):
    conn = await asyncpg.connect(fresh_dsn)
    worker = await asyncpg.connect(fresh_dsn)
    try:
        for sql in _files(4):
            await conn.execute(sql)
        # Records from before 0005: done long ago, rejected long ago, a pending row a COMMIT
        # behind ctx.db left (HALT: never a retention candidate), a recent done one.
        await conn.execute(
            """
            INSERT INTO dedup.inbox (namespace, key, payload_hash, hash_alg, status, topic,
                                     partition, "offset", first_seen_at, completed_at)
            VALUES ('n', 'old-done', 'h', 'sha256', 'done', 't', 0, 0,
                    now() - interval '2 days', now() - interval '2 days'),
                   ('n', 'old-rej', 'h', 'sha256', 'rejected', 't', 0, 1,
                    now() - interval '2 days', now() - interval '2 days'),
                   ('n', 'halt', 'h', 'sha256', 'pending', 't', 0, 2,
                    now() - interval '2 days', NULL),
                   ('n', 'new-done', 'h', 'sha256', 'done', 't', 0, 3, now(), now())
            """
        )
        # A worker's batch transaction holding a claim while the migration starts.
        tr = worker.transaction()
        await tr.start()
        text, args = inbox.claim([inbox.Claim("n", "in-flight", "h", "t", 0, 4)])
        assert len(await worker.fetch(text, *args)) == 1
        migration = asyncio.create_task(conn.execute(_files(5)[-1]))
        done, _ = await asyncio.wait({migration}, timeout=0.5)
        assert not done  # it waits for the batch (SHARE lock), it does not break it
        text, args = inbox.complete([inbox.Completion("n", "in-flight", "done", '"ok"', None)])
        assert await worker.execute(text, *args) == "UPDATE 1"
        await tr.commit()
        await asyncio.wait_for(migration, 30)

        text, args = inbox.expire(3600, 100)
        assert await conn.execute(text, *args) == "DELETE 2"
        left = {r["key"]: r["status"] for r in await conn.fetch("SELECT * FROM dedup.inbox")}
        assert left == {"halt": "pending", "new-done": "done", "in-flight": "done"}
        text, args = inbox.get("n", "halt")
        assert (await conn.fetchrow(text, *args))["status"] == "pending"
        text, args = inbox.evict("n", "halt")
        assert await conn.execute(text, *args) == "DELETE 1"
    finally:
        await worker.close()
        await conn.close()
