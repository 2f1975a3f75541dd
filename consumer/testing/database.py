"""The harness's database side: the real PgTx in a transaction that is never committed, and the
``ctx.db`` a handler sees (with injected failures, or a clear error when there is no database).

With a PostgreSQL connection, every batch transaction of the harness is a savepoint inside one
outer transaction, rolled back when the harness closes: the inbox, offsets, outbox and the
handler's own tables are real, and a test leaves nothing behind. Nothing here decides an
outcome; :class:`consumer.runtime.batch.BatchProcessor` does, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from consumer.context import Database
from consumer.db import migrate, offsets
from consumer.db.pool import _init as init_connection
from consumer.db.tx import BatchTx, PgTx
from consumer.dedup import inbox
from consumer.dedup.inbox import Completion, InboxRecord
from consumer.outbox.store import OutboxRow
from consumer.types import Ident


class DatabaseRequired(BaseException):
    """A handler used ``ctx.db`` in a :class:`TestApp` that was given no database.

    A ``BaseException`` on purpose, like pytest's own test outcomes: neither the handler's nor
    the runtime's ``except Exception`` may turn a test-setup mistake into a 'rejected' outcome.
    """


class Backend(Protocol):
    """What the harness needs from its store: transactions, and reads for assertions."""

    def begin(self, db: Database) -> contextlib.AbstractAsyncContextManager[BatchTx]: ...
    def take_committed(self) -> list[OutboxRow]: ...
    async def stored_offset(self, group: str, topic: str, partition: int) -> int | None: ...
    async def record(self, namespace: str, key: str) -> InboxRecord | None: ...
    async def close(self) -> None: ...


class Failures:
    """Failures armed by ``TestApp.fail_next_db_call``: raised by the next handler db calls."""

    def __init__(self) -> None:
        self.error: BaseException | type[BaseException] | None = None
        self.times = 0

    def arm(self, error: BaseException | type[BaseException], times: int) -> None:
        if times < 1:
            raise ValueError("times must be >= 1")
        self.error, self.times = error, times

    def fire(self) -> None:
        if self.times <= 0 or self.error is None:
            return
        self.times -= 1
        error = self.error
        if isinstance(error, type):
            raise error("injected by TestApp.fail_next_db_call")
        raise error


class HandlerDb:
    """``ctx.db`` in the harness: the real connection or none, behind the armed failures."""

    def __init__(self, conn: Database | None, failures: Failures) -> None:
        self._conn = conn
        self._failures = failures

    def _target(self, what: str) -> Any:
        self._failures.fire()
        if self._conn is None:
            raise DatabaseRequired(
                f"the handler called ctx.db.{what}, but this TestApp has no database: "
                "give it one, TestApp(app, db=<PostgreSQL DSN or asyncpg connection>)"
            )
        return self._conn

    async def execute(self, query: str, *args: Any) -> str:
        result: str = await self._target("execute").execute(query, *args)
        return result

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        rows: list[Any] = await self._target("fetch").fetch(query, *args)
        return rows

    async def fetchrow(self, query: str, *args: Any) -> Any:
        return await self._target("fetchrow").fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._target("fetchval").fetchval(query, *args)

    async def defer(self, query: str, *args: Any) -> None:
        # The harness runs every handler in its savepoint: sent now, as on that path.
        await self._target("defer").execute(query, *args)

    def __getattr__(self, name: str) -> Any:
        # Anything else an asyncpg connection offers (executemany, copy_records_to_table, ...)
        # is passed through, and counts as a database call for the armed failures.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._target(name), name)


class _RecordingPgTx(PgTx):
    """PgTx that also keeps the outbox rows it wrote, for the in-memory relay."""

    optimistic = False  # every handler in its savepoint: the harness's call counts are exact

    def __init__(self, conn: asyncpg.Connection, db: Database) -> None:
        super().__init__(conn)
        self.db = db
        self.rows: list[OutboxRow] = []

    async def outbox(self, rows: Sequence[OutboxRow]) -> None:
        await super().outbox(rows)
        self.rows.extend(rows)

    async def write(
        self,
        completions: Sequence[Completion],
        unclaim: Sequence[Ident],
        rows: Sequence[OutboxRow],
        position: tuple[str, str, int, int] | None,
    ) -> None:
        await super().write(completions, unclaim, rows, position)
        self.rows.extend(rows)


class PostgresBackend:
    """Real PostgreSQL: migrations applied, then one outer transaction rolled back on close."""

    def __init__(self, conn: asyncpg.Connection, owned: bool) -> None:
        self.conn = conn
        self._owned = owned
        self._outer: Any = None
        self._lock = asyncio.Lock()
        self._committed: list[OutboxRow] = []

    @classmethod
    async def open(
        cls, db: str | asyncpg.Connection, migrations: Mapping[str, Path] | None
    ) -> PostgresBackend:
        """Connect (or adopt ``db``), apply migrations unless None, start the outer transaction."""
        owned = isinstance(db, str)
        conn: asyncpg.Connection = await asyncpg.connect(db) if isinstance(db, str) else db
        try:
            # jsonb as Python values, exactly as the worker's pool decodes it.
            await init_connection(conn)
            if migrations is not None:
                await migrate.apply(conn, migrations)
            backend = cls(conn, owned)
            backend._outer = conn.transaction()
            await backend._outer.start()
        except BaseException:
            if owned:
                await conn.close()
            raise
        return backend

    @contextlib.asynccontextmanager
    async def begin(self, db: Database) -> AsyncIterator[BatchTx]:
        # A savepoint stands in for the batch transaction: its commit is visible to everything
        # that follows in this test, and the outer rollback removes it at the end.
        async with self._lock:
            tx = _RecordingPgTx(self.conn, db)
            async with self.conn.transaction():
                yield tx
            self._committed.extend(tx.rows)

    def take_committed(self) -> list[OutboxRow]:
        rows, self._committed = self._committed, []
        return rows

    async def stored_offset(self, group: str, topic: str, partition: int) -> int | None:
        text, args = offsets.stored(group, [(topic, partition)])
        rows = await self.conn.fetch(text, *args)
        return int(rows[0][2]) if rows else None

    async def record(self, namespace: str, key: str) -> InboxRecord | None:
        text, args = inbox.records([(namespace, key)])
        row = await self.conn.fetchrow(text, *args)
        return None if row is None else InboxRecord(*row)

    async def close(self) -> None:
        try:
            if self._outer is not None:
                await self._outer.rollback()
                self._outer = None
        finally:
            if self._owned:
                await self.conn.close()
