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
        # The completion as of the schema 0004 left (the code's own statement is written for
        # the newest schema, columns from later migrations included).
        done_sql = (
            "UPDATE dedup.inbox SET status = 'done', result = '\"ok\"', completed_at = now()"
            " WHERE namespace = 'n' AND key = 'in-flight'"
        )
        assert await worker.execute(done_sql) == "UPDATE 1"
        await tr.commit()
        await asyncio.wait_for(migration, 30)
        for sql in _files(10_000)[5:]:  # the migrations after 0005, for today's statements
            await conn.execute(sql)

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


async def test_an_optimistic_run_timed_out_mid_statement_keeps_none_of_it(settings, pg, unique):
    """wait_for cancels the handler while its statement runs: the statement was sent (``used``
    is set before the await), so the batch falls back and the write is undone."""
    from consumer import App, Context
    from tests.integration.dedup_support import Pay, direct_env, direct_processor, record

    await pg.execute("CREATE TABLE IF NOT EXISTS review_perf15 (k text NOT NULL)")
    async with direct_env(settings, pg, unique, "review15", max_attempts=3, optimistic=True) as e:
        app = App(e["group"], settings=e["settings"])

        @app.handler(e["topic"], schema=Pay, key=lambda p: p.id, timeout_s=0.5)
        async def pay(p: Pay, ctx: Context) -> str:
            if p.id.startswith("slow"):
                await ctx.db.execute(
                    f"INSERT INTO review_perf15 (k) VALUES ('{p.id}'); SELECT pg_sleep(30)"
                )
            return "ok"

        processor = direct_processor(app, e)
        keys = [f"ok-{unique}", f"slow-{unique}"]
        result = await processor.process(
            [record(e["topic"], i, {"id": k}) for i, k in enumerate(keys)]
        )
    assert processor.fallbacks == 1
    assert result.retry_offset == 1  # the timeout is transient: the batch stops at it
    rows = await pg.fetch("SELECT k FROM review_perf15 WHERE k = ANY($1)", keys)
    assert rows == []
