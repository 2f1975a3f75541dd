"""The inbox row is written once and completed in place: the completion is a HOT update.

A batch claims its new keys (INSERT ... 'pending') and completes them (UPDATE ... 'done') in
the same transaction. Migration 0005 makes that UPDATE a heap-only tuple update: no index
covers a column it changes, and pages keep room for the new version. Checked with the
framework's own statements (consumer/dedup/inbox.py) and PostgreSQL's per-transaction
counters, which the same session reads before its COMMIT (issue 15).
"""

from __future__ import annotations

import json

import pytest

from consumer.dedup import inbox

pytestmark = pytest.mark.integration


async def test_completing_claimed_rows_is_a_hot_update(pg, unique):
    n = 500
    claims = [
        inbox.Claim(f"hot-{unique}", f"k-{i:04d}-{unique}", "h" * 64, "t", 0, i) for i in range(n)
    ]
    result = json.dumps({"payment_id": "p-000123-abcdef", "cents": 12345})
    done = [inbox.Completion(c.namespace, c.key, "done", result, None) for c in claims]
    async with pg.transaction():
        text, args = inbox.claim(claims)
        assert len(await pg.fetch(text, *args)) == n
        text, args = inbox.complete(done)
        assert await pg.execute(text, *args) == f"UPDATE {n}"
        row = await pg.fetchrow(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
            " WHERE schemaname = 'dedup' AND relname = 'inbox'"
        )
        assert (row["n_tup_upd"], row["n_tup_hot_upd"]) == (n, n)
    await pg.execute("DELETE FROM dedup.inbox WHERE namespace = $1", f"hot-{unique}")


async def test_no_index_covers_a_column_the_completion_changes(pg):
    indexed = await pg.fetch(
        """
        SELECT DISTINCT a.attname FROM pg_index i
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
        WHERE i.indrelid = 'dedup.inbox'::regclass
        """
    )
    changed = {"status", "result", "reason", "completed_at"}
    assert not changed & {r[0] for r in indexed}
    options = await pg.fetchval(
        "SELECT reloptions FROM pg_class WHERE oid = 'dedup.inbox'::regclass"
    )
    assert "fillfactor=40" in (options or [])
