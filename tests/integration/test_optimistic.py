"""Optimistic execution: handlers without a savepoint each, and the fallback when one fails.

A batch runs its handlers with no SAVEPOINT per message; a run that does not end cleanly
(an exception, a Reject, a statement error the handler swallowed, an unstorable result) rolls
the whole transaction back and the batch runs again with savepoints, so the outcomes and the
rows are exactly those of the guarded path. The price, documented in docs/handlers.md: the
handlers of that batch ran twice (their database effects once).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from consumer import App, Context, Reject
from consumer.runtime.outcomes import Outcome
from tests.integration.dedup_support import Pay, direct_env, direct_processor, inbox, record

pytestmark = pytest.mark.integration


@pytest.fixture
async def env(settings, pg, unique) -> AsyncIterator[dict[str, Any]]:
    await pg.execute("CREATE TABLE IF NOT EXISTS test_optimistic (k text NOT NULL, v text)")
    async with direct_env(settings, pg, unique, "optimistic", max_attempts=3, optimistic=True) as e:
        yield e


def _app(env: dict[str, Any], calls: list[str]) -> App:
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def pay(p: Pay, ctx: Context) -> str:
        calls.append(p.id)
        await ctx.db.execute("INSERT INTO test_optimistic (k, v) VALUES ($1, $2)", p.id, "x")
        if p.id.startswith("reject"):
            raise Reject("no")
        if p.id.startswith("swallow"):
            try:
                await ctx.db.execute("SELECT 1/0")
            except asyncpg.DataError:
                pass  # the transaction is aborted all the same
        return "ok"

    return app


async def _effects(pg: asyncpg.Connection, keys: list[str]) -> dict[str, int]:
    rows = await pg.fetch(
        "SELECT k, count(*) AS n FROM test_optimistic WHERE k = ANY($1) GROUP BY k", keys
    )
    return {r["k"]: r["n"] for r in rows}


async def test_a_clean_batch_runs_each_handler_once_without_falling_back(env, pg, unique):
    calls: list[str] = []
    processor = direct_processor(_app(env, calls), env)
    keys = [f"ok-{unique}-{i}" for i in range(5)]
    result = await processor.process(
        [record(env["topic"], i, {"id": k}) for i, k in enumerate(keys)]
    )
    assert [h.outcome for h in result.handled] == [Outcome.APPLIED] * 5
    assert processor.fallbacks == 0 and calls == keys
    assert await _effects(pg, keys) == {k: 1 for k in keys}


@pytest.mark.parametrize("bad", ["reject", "swallow"])
async def test_a_failed_run_falls_back_to_savepoints_with_exact_outcomes(env, pg, unique, bad):
    calls: list[str] = []
    processor = direct_processor(_app(env, calls), env)
    keys = [f"ok-{unique}-a", f"{bad}-{unique}", f"ok-{unique}-b"]
    msgs = [record(env["topic"], i, {"id": k}) for i, k in enumerate(keys)]
    result = await processor.process(msgs)
    expected = Outcome.REJECTED if bad == "reject" else Outcome.APPLIED
    if bad == "swallow":
        # A swallowed statement error is the run's failure (retried): the batch stops there.
        assert [h.outcome for h in result.handled] == [Outcome.APPLIED]
        assert result.retry_offset == 1
    else:
        assert [h.outcome for h in result.handled] == [Outcome.APPLIED, expected, Outcome.APPLIED]
    assert processor.fallbacks == 1
    # The optimistic attempt ran the first two handlers; the guarded run ran them again.
    assert calls[:2] == keys[:2] and calls[2:4] == keys[:2]
    effects = await _effects(pg, keys)
    assert effects.get(keys[0]) == 1 and keys[1] not in effects  # database effects once
    rows = await inbox(pg, f"{env['group']}.pay")
    assert rows[keys[0]]["status"] == "done"
    if bad == "reject":
        assert rows[keys[1]]["status"] == "rejected" and effects.get(keys[2]) == 1


async def test_after_a_fallback_the_partition_stays_on_savepoints_for_a_while(env, pg, unique):
    calls: list[str] = []
    processor = direct_processor(_app(env, calls), env)
    topic = env["topic"]
    await processor.process([record(topic, 0, {"id": f"reject-{unique}"})])
    assert processor.fallbacks == 1
    cooldown = env["settings"].optimistic_cooldown_batches
    assert processor.guarded[(topic, 0)] == cooldown
    await processor.process([record(topic, 1, {"id": f"reject-{unique}-2"})])
    # Guarded: the reject ran once, no second fallback.
    assert processor.fallbacks == 1 and calls.count(f"reject-{unique}-2") == 1
    assert processor.guarded[(topic, 0)] == cooldown - 1


@pytest.mark.parametrize("bad", ["early-reject", "early-retry"])
async def test_a_failure_before_any_statement_needs_no_fallback(env, pg, unique, bad):
    """A handler that fails before sending anything on ctx.db left nothing a savepoint would
    undo: its outcome is taken as is, and the handlers before it are not run again."""
    from consumer import Retry

    calls: list[str] = []
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def pay(p: Pay, ctx: Context) -> str:
        calls.append(p.id)
        if p.id.startswith("early-reject"):
            ctx.publish("never-published", {"id": p.id})  # dropped with the failed call
            raise Reject("checked before writing")
        if p.id.startswith("early-retry"):
            raise Retry("the gateway is down", delay_s=0.01)
        await ctx.db.execute("INSERT INTO test_optimistic (k, v) VALUES ($1, $2)", p.id, "x")
        return "ok"

    processor = direct_processor(app, env)
    keys = [f"ok-{unique}-a", f"{bad}-{unique}", f"ok-{unique}-b"]
    result = await processor.process(
        [record(env["topic"], i, {"id": k}) for i, k in enumerate(keys)]
    )
    assert processor.fallbacks == 0
    rows = await inbox(pg, f"{env['group']}.pay")
    if bad == "early-reject":
        applied, rejected = Outcome.APPLIED, Outcome.REJECTED
        assert [h.outcome for h in result.handled] == [applied, rejected, applied]
        assert calls == keys and rows[keys[1]]["status"] == "rejected"
        published = await pg.fetchval(
            "SELECT count(*) FROM dedup.outbox WHERE topic = 'never-published'"
            " AND idempotency_key LIKE $1",
            f"%{unique}%",
        )
        assert published == 0
    else:
        # Transient: the batch stops at it, nothing recorded for it, the first one committed.
        assert [h.outcome for h in result.handled] == [Outcome.APPLIED]
        assert result.retry_offset == 1 and keys[1] not in rows
        assert calls == keys[:2]
    effects = {keys[0]: 1, **({keys[2]: 1} if bad == "early-reject" else {})}
    assert await _effects(pg, keys) == effects


async def test_the_fallback_runs_on_payloads_the_first_run_did_not_change(env, pg, unique):
    """A handler that edits its payload model (normalising a field in place, say) before a
    later message of the batch fails: the batch runs again with savepoints, and the re-run
    must see the message as it arrived, not as the rolled-back run left it."""
    from pydantic import BaseModel

    class Tagged(BaseModel):
        id: str
        tags: list[str]

    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Tagged, key=lambda p: p.id)
    async def tag(p: Tagged, ctx: Context) -> str:
        p.tags.append("seen")  # in place: the rolled-back run's edit must not leak
        await ctx.db.execute(
            "INSERT INTO test_optimistic (k, v) VALUES ($1, $2)", p.id, ",".join(p.tags)
        )
        if p.id.startswith("reject"):
            raise Reject("no")
        return ",".join(p.tags)

    processor = direct_processor(app, env)
    keys = [f"ok-{unique}-a", f"reject-{unique}", f"ok-{unique}-b"]
    result = await processor.process(
        [record(env["topic"], i, {"id": k, "tags": ["t"]}) for i, k in enumerate(keys)]
    )
    assert processor.fallbacks == 1
    assert [h.outcome for h in result.handled] == [
        Outcome.APPLIED,
        Outcome.REJECTED,
        Outcome.APPLIED,
    ]
    rows = await pg.fetch("SELECT k, v FROM test_optimistic WHERE k = ANY($1)", keys)
    assert {r["k"]: r["v"] for r in rows} == {keys[0]: "t,seen", keys[2]: "t,seen"}
    rows_by_key = await inbox(pg, f"{env['group']}.tag")
    assert rows_by_key[keys[0]]["result"] == "t,seen"


# ---------------------------------------------------------------- ctx.db.defer


def _deferring_app(env: dict[str, Any], calls: list[str]) -> App:
    """``defer`` for the write; ``read-`` reads its own row back; ``late-reject`` rejects
    after deferring; ``dup-`` defers a row the table's unique index refuses."""
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def pay(p: Pay, ctx: Context) -> str:
        calls.append(p.id)
        await ctx.db.defer("INSERT INTO test_deferred (k, v) VALUES ($1, $2)", p.id, "x")
        if p.id.startswith("late-reject"):
            raise Reject("after deferring")
        if p.id.startswith("read"):
            n = await ctx.db.fetchval("SELECT count(*) FROM test_deferred WHERE k = $1", p.id)
            return f"seen {n}"
        return "ok"

    return app


@pytest.fixture
async def deferred_table(pg) -> None:
    await pg.execute(
        "CREATE TABLE IF NOT EXISTS test_deferred (k text NOT NULL, v text,"
        " CONSTRAINT test_deferred_k CHECK (k NOT LIKE 'bad-%'))"
    )


async def _deferred(pg: asyncpg.Connection, keys: list[str]) -> dict[str, int]:
    rows = await pg.fetch(
        "SELECT k, count(*) AS n FROM test_deferred WHERE k = ANY($1) GROUP BY k", keys
    )
    return {r["k"]: r["n"] for r in rows}


async def test_deferred_statements_commit_with_the_batch_and_reads_see_them(
    env, pg, unique, deferred_table
):
    calls: list[str] = []
    processor = direct_processor(_deferring_app(env, calls), env)
    keys = [f"ok-{unique}-{i}" for i in range(4)] + [f"read-{unique}"]
    result = await processor.process(
        [record(env["topic"], i, {"id": k}) for i, k in enumerate(keys)]
    )
    assert [h.outcome for h in result.handled] == [Outcome.APPLIED] * 5
    assert processor.fallbacks == 0 and calls == keys
    assert await _deferred(pg, keys) == {k: 1 for k in keys}
    rows = await inbox(pg, f"{env['group']}.pay")
    assert rows[f"read-{unique}"]["result"] == "seen 1"  # its own queued row, sent first


async def test_a_rejected_run_drops_its_queued_statements_without_a_fallback(
    env, pg, unique, deferred_table
):
    calls: list[str] = []
    processor = direct_processor(_deferring_app(env, calls), env)
    keys = [f"ok-{unique}-a", f"late-reject-{unique}", f"ok-{unique}-b"]
    result = await processor.process(
        [record(env["topic"], i, {"id": k}) for i, k in enumerate(keys)]
    )
    assert [h.outcome for h in result.handled] == [
        Outcome.APPLIED,
        Outcome.REJECTED,
        Outcome.APPLIED,
    ]
    assert processor.fallbacks == 0 and calls == keys
    assert await _deferred(pg, keys) == {keys[0]: 1, keys[2]: 1}


async def test_a_deferred_statement_refused_at_the_end_falls_back_with_exact_outcomes(
    env, pg, unique, deferred_table
):
    """The server refuses one queued row when the queue is sent: whose it is cannot be told
    there, so the batch runs again with savepoints, where that handler's own call fails."""
    calls: list[str] = []
    processor = direct_processor(_deferring_app(env, calls), env)
    keys = [f"ok-{unique}-a", f"bad-{unique}", f"ok-{unique}-b"]
    result = await processor.process(
        [record(env["topic"], i, {"id": k}) for i, k in enumerate(keys)]
    )
    assert processor.fallbacks == 1
    # Guarded: the first is applied, the refused one is this handler's error (retried, so
    # the batch stops there with nothing recorded for it).
    assert [h.outcome for h in result.handled] == [Outcome.APPLIED]
    assert result.retry_offset == 1
    assert await _deferred(pg, keys) == {keys[0]: 1}
    rows = await inbox(pg, f"{env['group']}.pay")
    assert rows[keys[0]]["status"] == "done" and keys[1] not in rows


async def test_a_deferred_statement_asyncpg_refuses_client_side_falls_back_not_stalls(
    env, pg, unique, deferred_table
):
    """Too many arguments for the statement: asyncpg raises InterfaceError (no SQLSTATE) only
    when the queue is sent. That must fall back like a server's refusal, so the guarded run
    makes it the handler's own error; re-raised, the batch failed as a whole on every retry."""
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Pay, key=lambda p: p.id)
    async def pay(p: Pay, ctx: Context) -> str:
        if p.id.startswith("extra"):
            await ctx.db.defer("INSERT INTO test_deferred (k) VALUES ($1)", p.id, "surplus")
        else:
            await ctx.db.defer("INSERT INTO test_deferred (k, v) VALUES ($1, $2)", p.id, "x")
        return "ok"

    processor = direct_processor(app, env)
    keys = [f"ok-{unique}-a", f"extra-{unique}"]
    result = await processor.process(
        [record(env["topic"], i, {"id": k}) for i, k in enumerate(keys)]
    )
    assert processor.fallbacks == 1
    assert [h.outcome for h in result.handled][:1] == [Outcome.APPLIED]
    assert await _deferred(pg, keys) == {keys[0]: 1}
