"""What a handler sends on ``ctx.db`` cannot change what the framework rolls back or commits
(issue 13, finding 1, and its siblings), against real PostgreSQL.

- A handler's own savepoint, whatever its name, stays nested inside the message's savepoint:
  a ``Retry`` or ``Reject`` still undoes the run's writes (the framework's savepoint was once
  plainly ``msg``, and a handler's ``SAVEPOINT msg`` shadowed it: double apply on retry).
- Statements that would end or reshape the batch transaction, or outlive it in the pooled
  session, are refused at the call (consumer/db/guard.py): the run fails, the batch is intact.
- A transaction ended behind the guard (the raw connection) is detected before anything else
  is sent, and the batch is retried as a whole instead of committing in autocommit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from consumer import App, Context, Reject, Retry
from consumer.runtime.outcomes import Outcome
from tests.integration.dedup_support import Pay, direct_env, direct_processor, drive, inbox, record

pytestmark = pytest.mark.integration


@pytest.fixture
async def env(settings, pg, unique) -> AsyncIterator[dict[str, Any]]:
    table = f"hsql_{unique}"
    await pg.execute(f"CREATE TABLE {table} (k text)")
    async with direct_env(settings, pg, unique, "hsql", max_attempts=3) as e:
        e["table"] = table
        yield e
    await pg.execute(f"DROP TABLE {table}")


async def rows(pg, table: str) -> list[str]:
    return sorted(r["k"] for r in await pg.fetch(f"SELECT k FROM {table}"))


@pytest.mark.parametrize("name", ["msg", "sp", "asyncpg_savepoint_1"])
@pytest.mark.parametrize("signal", ["retry", "reject"])
async def test_a_handler_savepoint_cannot_shadow_the_messages(env, pg, name, signal):
    app = App(env["group"], settings=env["settings"])
    calls: list[int] = []

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        calls.append(ctx.attempt)
        await ctx.db.execute(f"INSERT INTO {env['table']} VALUES ($1)", f"{p.id}-{len(calls)}")
        # docs/handlers.md: run the risky statement in your own nested savepoint.
        await ctx.db.execute(f"SAVEPOINT {name}")
        await ctx.db.execute("SELECT 1")
        await ctx.db.execute(f"ROLLBACK TO SAVEPOINT {name}")
        if len(calls) == 1:
            raise Retry() if signal == "retry" else Reject("no")
        return {"ok": 1}

    results = await drive(direct_processor(app, env), [record(env["topic"], 0, {"id": "k"})], 5)
    outcomes = [h.outcome for r in results for h in r.handled]
    row = (await inbox(pg, f"{env['group']}.handle"))["k"]
    if signal == "retry":
        assert outcomes == [Outcome.APPLIED]
        assert await rows(pg, env["table"]) == ["k-2"]  # the failed attempt's write is undone
        assert row["status"] == "done"
    else:
        assert outcomes == [Outcome.REJECTED]
        assert await rows(pg, env["table"]) == []  # a rejection keeps nothing
        assert row["status"] == "rejected"


REFUSED = [
    "COMMIT",
    "END",
    "ROLLBACK",
    "ABORT",
    "BEGIN",
    "START TRANSACTION",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "SET LOCAL transaction_read_only = on",
    "SET search_path = pg_catalog",
    "SET statement_timeout = '1ms'",
    "SET ROLE pg_monitor",
    "RESET ALL",
    "DISCARD ALL",
    "PREPARE TRANSACTION 'hsql'",
    "PREPARE hsql_stmt AS SELECT 1",
    "DEALLOCATE ALL",
    "SELECT set_config('search_path', 'pg_catalog', false)",
    "SELECT 1; COMMIT",
    # A typed literal of a type whose name ends in "e" is not an E'' string: the backslash
    # does not escape the quote, so the COMMIT after it is a statement of its own.
    "SELECT name'x\\'; COMMIT; SELECT 1 --'",
    # Dollar-quoted bodies run set_config/SET just the same.
    "DO $$ BEGIN PERFORM set_config('search_path', 'pg_catalog', false); END $$",
    "DO $do$ BEGIN SET statement_timeout = '1ms'; END $do$",
]


@pytest.mark.parametrize("statement", REFUSED)
async def test_statements_that_reshape_the_batch_are_refused(env, pg, statement):
    """Every run of "k" sends the statement after a write, between "a" and "z" of the same
    batch. "k" must fail as a handler bug does (retried, then a ``failed`` dead letter with
    nothing recorded and nothing of it kept); "a" and "z" are applied exactly once; the batch
    never commits half of itself nor stalls, and the pooled sessions keep their settings."""
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        await ctx.db.execute(f"INSERT INTO {env['table']} VALUES ($1)", p.id)
        if p.id == "k":
            await ctx.db.execute(statement)
        return {"ok": 1}

    msgs = [record(env["topic"], i, {"id": k}) for i, k in enumerate(["a", "k", "z"])]
    results = await drive(direct_processor(app, env), msgs, 6)
    outcomes = [(h.message.offset, h.outcome) for r in results for h in r.handled]
    records = await inbox(pg, f"{env['group']}.handle")
    assert {k: r["status"] for k, r in records.items()} == {"a": "done", "z": "done"}, outcomes
    assert await rows(pg, env["table"]) == ["a", "z"]
    assert outcomes == [(0, Outcome.APPLIED), (1, Outcome.FAILED), (2, Outcome.APPLIED)]
    failed = next(h for r in results for h in r.handled if h.outcome is Outcome.FAILED)
    assert "ctx.db refused" in failed.reason
    for _ in range(2):  # both pooled sessions
        async with env["pool"].acquire() as conn:
            assert await conn.fetchval("SHOW search_path") == '"$user", public'
            assert await conn.fetchval("SHOW statement_timeout") == "0"
            assert await conn.fetchval("SHOW default_transaction_read_only") == "off"


async def test_harmless_transaction_use_keeps_exactly_once(env, pg):
    """A nested ``ctx.db.transaction()``, a handler's own RELEASE, LOCK and SET CONSTRAINTS
    stay inside the message's savepoint: a retry after them applies once."""
    app = App(env["group"], settings=env["settings"])
    calls: list[int] = []

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        calls.append(ctx.attempt)
        await ctx.db.execute(f"LOCK TABLE {env['table']} IN ROW EXCLUSIVE MODE")
        await ctx.db.execute("SET CONSTRAINTS ALL IMMEDIATE")
        async with ctx.db.transaction():
            await ctx.db.execute(f"INSERT INTO {env['table']} VALUES ($1)", f"tx-{len(calls)}")
        await ctx.db.execute("SAVEPOINT mine")
        await ctx.db.execute(f"INSERT INTO {env['table']} VALUES ($1)", f"sp-{len(calls)}")
        await ctx.db.execute("RELEASE SAVEPOINT mine")
        if len(calls) == 1:
            raise Retry()
        return {"ok": 1}

    results = await drive(direct_processor(app, env), [record(env["topic"], 0, {"id": "k"})], 5)
    assert [h.outcome for r in results for h in r.handled] == [Outcome.APPLIED]
    assert await rows(pg, env["table"]) == ["sp-2", "tx-2"]


async def test_a_transaction_ended_behind_the_guard_is_not_continued(env, pg):
    """Past the guard (the raw connection), a ROLLBACK ends the batch transaction;
    continuing would run the framework's statements in autocommit: the stored position moved
    with no record behind it. The framework notices before sending anything else, the batch
    is retried, and the key is applied once with its record."""
    app = App(env["group"], settings=env["settings"])
    calls: list[int] = []

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            await ctx.db._conn.execute("ROLLBACK")  # type: ignore[attr-defined]
        else:
            await ctx.db.execute(f"INSERT INTO {env['table']} VALUES ($1)", p.id)
        return {"ok": 1}

    results = await drive(direct_processor(app, env), [record(env["topic"], 0, {"id": "k"})], 5)
    assert "TransactionEnded" in results[0].error, [r.error for r in results]
    assert [h.outcome for r in results for h in r.handled] == [Outcome.APPLIED]
    assert await rows(pg, env["table"]) == ["k"]
    assert (await inbox(pg, f"{env['group']}.handle"))["k"]["status"] == "done"


async def test_a_commit_behind_the_guard_answers_nothing_from_pending_records(env, pg):
    """Past the guard (the raw connection), a COMMIT commits the batch so far, with the claims
    of every key of the batch still ``pending``, including those whose handler never ran. A
    pending record decides nothing: answered as a duplicate it would drop "z" (never applied)
    and answer "a" with no result. The partition stops at the first one, with an error that
    says what happened, until an operator (who can see the effects) evicts the keys."""
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def handle(p: Pay, ctx: Context) -> Any:
        await ctx.db.execute(f"INSERT INTO {env['table']} VALUES ($1)", p.id)
        if p.id == "k":
            await ctx.db._conn.execute("COMMIT")  # type: ignore[attr-defined]
        return {"ok": 1}

    msgs = [record(env["topic"], i, {"id": k}) for i, k in enumerate(["a", "k", "z"])]
    results = await drive(direct_processor(app, env), msgs, 3)
    outcomes = [h.outcome for r in results for h in r.handled]
    assert Outcome.DUPLICATE not in outcomes, outcomes
    assert "TransactionEnded" in results[0].error, [r.error for r in results]
    assert all("pending" in (r.error or "") for r in results[1:]), [r.error for r in results]
    assert await rows(pg, env["table"]) == ["a", "k"]  # what the stray COMMIT kept
