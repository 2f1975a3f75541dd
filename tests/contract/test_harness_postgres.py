"""TestApp on real PostgreSQL: what it leaves behind (nothing), and how it treats a connection.

The protocol scenarios are in test_contract.py; these are about the harness's database side.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from pydantic import BaseModel

from consumer import App, Context, Outcome, Settings
from consumer.testing import TestApp

pytestmark = pytest.mark.integration

DDL = "CREATE {temp} TABLE {name} (text text PRIMARY KEY, note_id text)"


class Note(BaseModel):
    note_id: str
    text: str


def notes_app(group: str, table: str, settings: Settings) -> App:
    app = App(group, settings=settings)

    @app.handler("notes", schema=Note, key=lambda n: n.note_id, on_error="reject")
    async def save(n: Note, ctx: Context) -> int:
        # The primary key is on text: a second note with the same text violates it.
        await ctx.db.execute(f"INSERT INTO {table} VALUES ($1, $2)", n.text, n.note_id)
        return int(await ctx.db.fetchval(f"SELECT count(*) FROM {table}"))

    return app


@pytest.fixture
async def table(pg: asyncpg.Connection, unique: str) -> AsyncIterator[str]:
    name = f"notes_{unique}"
    await pg.execute(DDL.format(temp="", name=name))
    try:
        yield name
    finally:
        await pg.execute(f"DROP TABLE {name}")


async def test_nothing_survives_the_harness(
    settings: Settings, pg: asyncpg.Connection, unique: str, table: str
) -> None:
    app = notes_app(f"notes-{unique}", table, settings)
    async with TestApp(app, db=settings.postgres_dsn) as t:
        r = await t.send("notes", Note(note_id="n1", text="hello"))
        assert (r.outcome, r.result) == (Outcome.APPLIED, 1)
        # Positions are stored under the harness's own group, never the app's.
        groups = await t.db.fetch(
            "SELECT group_id FROM dedup.offsets WHERE group_id LIKE $1", f"notes-{unique}%"
        )
        assert [g["group_id"] for g in groups] == [t.group]
        assert t.group.startswith(f"notes-{unique}.testapp-")
    assert await pg.fetchval(f"SELECT count(*) FROM {table}") == 0
    inbox = await pg.fetchval(
        "SELECT count(*) FROM dedup.inbox WHERE namespace = $1", f"notes-{unique}.save"
    )
    offsets = await pg.fetchval(
        "SELECT count(*) FROM dedup.offsets WHERE group_id LIKE $1", f"notes-{unique}%"
    )
    assert (inbox, offsets) == (0, 0)


async def test_a_failing_statement_rolls_back_its_message_only(
    settings: Settings, unique: str, table: str
) -> None:
    app = notes_app(f"notes-{unique}", table, settings)
    async with TestApp(app, db=settings.postgres_dsn) as t:
        first = await t.send("notes", Note(note_id="n1", text="same"))
        clash = await t.send("notes", Note(note_id="n2", text="same"))
        after = await t.send("notes", Note(note_id="n3", text="other"))
        assert first.outcome is Outcome.APPLIED
        assert clash.outcome is Outcome.REJECTED
        assert clash.reason.startswith("error: UniqueViolationError")
        assert (after.outcome, after.result) == (Outcome.APPLIED, 2)
        record = await t.inbox("notes", "n2")
        assert record is not None and record.status == "rejected"


async def test_a_given_connection_is_used_and_left_open(settings: Settings, unique: str) -> None:
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        name = f"notes_{unique}"
        await conn.execute(DDL.format(temp="TEMP", name=name))
        app = notes_app(f"notes-{unique}", name, settings)
        async with TestApp(app, db=conn, migrate=False) as t:
            assert t.db is conn
            r = await t.send("notes", Note(note_id="n1", text="x"))
            assert r.outcome is Outcome.APPLIED
            record = await t.inbox("notes", "n1")
            assert record is not None and record.result == 1  # jsonb decoded, as in the worker
        assert not conn.is_closed() and not conn.is_in_transaction()
        assert await conn.fetchval(f"SELECT count(*) FROM {name}") == 0
    finally:
        await conn.close()


async def test_fail_next_db_call_takes_the_runtime_retry_path(
    settings: Settings, unique: str, table: str
) -> None:
    app = notes_app(f"notes-{unique}", table, settings.model_copy(update={"max_attempts": 2}))
    async with TestApp(app, db=settings.postgres_dsn) as t:
        t.fail_next_db_call(ConnectionResetError)
        ok = await t.send("notes", Note(note_id="n1", text="a"))
        assert (ok.outcome, ok.result, ok.handler_calls) == (Outcome.APPLIED, 1, 2)
        t.fail_next_db_call(TimeoutError, times=2)
        exhausted = await t.send("notes", Note(note_id="n2", text="b"))
        assert exhausted.outcome is Outcome.FAILED
        assert exhausted.reason.startswith("attempts_exhausted (2): TimeoutError")
        assert await t.inbox("notes", "n2") is None  # transient: the key is not burned
        assert await t.db.fetchval(f"SELECT count(*) FROM {table}") == 1
