"""The batch transaction: every store operation one batch needs, on one connection.

:class:`BatchTx` is the contract; :class:`PgTx` runs it on PostgreSQL. The in-memory harness
(``MemoryTx`` in consumer/testing/store.py) implements the same contract, and one contract
test suite (tests/contract/) runs against both. This module only executes queries defined
next to their tables.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any, Protocol

import asyncpg

from consumer.context import Database
from consumer.db import flush, guard, offsets
from consumer.db.flush import Position
from consumer.dedup import inbox
from consumer.dedup.inbox import Claim, Completion, InboxRecord
from consumer.errors import TransactionEnded
from consumer.outbox import store as outbox
from consumer.outbox.store import OutboxRow
from consumer.types import Ident, Query


class BatchTx(Protocol):
    """The store operations of one batch, all inside ONE database transaction.

    The runtime calls them in this order (docs/design.md, "The protocol"): ``lock_offset``,
    ``claim`` and ``records``; per handler call ``savepoint`` then ``release_savepoint`` or
    ``rollback_savepoint``; then ``complete``, ``unclaim``, ``outbox`` and ``advance_offset``;
    then the caller commits. Nothing is visible to anyone else before that commit.
    """

    db: Database
    """The connection as a handler sees it (``ctx.db``): queries checked, failures noted."""

    async def lock_offset(self, group: str, topic: str, partition: int) -> int:
        """Lock the partition's stored position for the rest of the transaction and return
        it (-1 if none): a zombie owner waits here, then sees the records already done."""
        ...

    async def claim(self, rows: Sequence[Claim]) -> set[Ident]:
        """Insert a ``pending`` inbox row per key not stored yet; returns the keys claimed.
        A key another open transaction claimed blocks here until that one ends."""
        ...

    async def records(self, idents: Sequence[Ident]) -> dict[Ident, InboxRecord]:
        """The inbox rows of these keys as this transaction sees them (claimed ones too)."""
        ...

    async def savepoint(self) -> None:
        """Open the savepoint of one handler call (the previous one's release may ride
        along)."""
        ...

    optimistic: bool  # whether handlers may run without a savepoint (watch/clean work)

    def watch(self) -> None:
        """Start watching ``db`` for a failed statement (an optimistic run, no savepoint)."""
        ...

    def clean(self) -> bool:
        """No statement on ``db`` failed (or could have) since :meth:`watch`."""
        ...

    def touched(self) -> bool:
        """Something was sent on ``db`` (or could have been) since :meth:`watch`: an
        optimistic run that failed after that has writes no savepoint can undo."""
        ...

    def drop_deferred(self) -> None:
        """Forget the statements ``db.defer`` queued since :meth:`watch` (never sent): the
        optimistic run that queued them did not end well."""
        ...

    async def send_deferred(self) -> None:
        """Send every statement ``db.defer`` queued (an optimistic batch, before its writes).
        An error here is some queued statement's: the caller falls back."""
        ...

    async def rollback_savepoint(self) -> None:
        """Undo everything since :meth:`savepoint`: a failed or retried handler call.
        Raises TransactionEnded if the handler ended the transaction itself."""
        ...

    async def release_savepoint(self) -> None:
        """Keep the handler call's writes (possibly deferred to the next savepoint when no
        statement of it failed). Raises TransactionEnded as :meth:`rollback_savepoint`."""
        ...

    async def complete(self, rows: Sequence[Completion]) -> None:
        """Turn claimed (``pending``) rows into ``done`` or ``rejected`` with their result."""
        ...

    async def unclaim(self, idents: Sequence[Ident]) -> None:
        """Delete claimed rows the batch stopped before: read again later, they leave no trace."""
        ...

    async def outbox(self, rows: Sequence[OutboxRow]) -> None:
        """Write outbox rows (published messages, replies, dead letters, conflicts); the
        relay publishes them after the commit."""
        ...

    async def advance_offset(
        self, group: str, topic: str, partition: int, next_offset: int
    ) -> None:
        """Move the stored position forward to ``next_offset`` (never backwards)."""
        ...

    async def write(
        self,
        completions: Sequence[Completion],
        unclaim: Sequence[Ident],
        rows: Sequence[OutboxRow],
        position: Position | None,
    ) -> None:
        """``complete``, ``unclaim``, ``outbox`` and ``advance_offset`` (``position``: group,
        topic, partition, next offset; None to leave it) as one step: on PostgreSQL one
        statement (consumer/db/flush.py)."""
        ...


# Connection methods that take a query as their first argument: checked like execute().
_QUERY_METHODS = frozenset({"executemany", "prepare", "cursor", "fetchmany"})


class _Watched:
    """The connection as a handler sees it, noting whether it may have left the transaction
    failed since the message's savepoint: a statement raised (even if the handler swallowed
    the error), or the handler used anything else of the connection (not followed here).
    Every query goes through :func:`consumer.db.guard.check` first.
    """

    __slots__ = ("_conn", "clean", "deferred", "deferring", "first_error", "mark", "used")

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        # ``defer``'s statements, not sent yet, and where the current run's begin (``mark``);
        # only an optimistic run queues them (``deferring``), a savepoint sends them first.
        self.deferred: list[tuple[str, tuple[Any, ...]]] = []
        self.deferring = False
        self.mark = 0
        self.clean = True
        self.used = False  # a statement was sent (or may have been) since the last watch
        # The first statement error since the savepoint: what a later "current transaction
        # is aborted" (25P02) really means, for classifying the message's failure.
        self.first_error: BaseException | None = None

    def _failed(self, exc: BaseException) -> None:
        self.clean = False
        # Only an error from the server aborts the transaction, and only the server's carry a
        # severity: asyncpg refusing an argument client-side (a DataError with SQLSTATE 22000
        # and nothing else) sends nothing and leaves the savepoint as it was.
        if self.first_error is None and getattr(exc, "severity", None):
            self.first_error = exc

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> str:
        guard.check(query)
        await self.send()
        self.used = True
        try:
            result: str = await self._conn.execute(query, *args, **kwargs)
            return result
        except BaseException as exc:
            self._failed(exc)
            raise

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> list[Any]:
        guard.check(query)
        await self.send()
        self.used = True
        try:
            rows: list[Any] = await self._conn.fetch(query, *args, **kwargs)
            return rows
        except BaseException as exc:
            self._failed(exc)
            raise

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        guard.check(query)
        await self.send()
        self.used = True
        try:
            return await self._conn.fetchrow(query, *args, **kwargs)
        except BaseException as exc:
            self._failed(exc)
            raise

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        guard.check(query)
        await self.send()
        self.used = True
        try:
            return await self._conn.fetchval(query, *args, **kwargs)
        except BaseException as exc:
            self._failed(exc)
            raise

    async def executemany(self, query: str, args: Any, **kwargs: Any) -> None:
        # Followed like execute(): set-based handlers use it, and an unfollowed call would
        # make every optimistic run of theirs fall back (runtime/invoke.py).
        guard.check(query)
        await self.send()
        self.used = True
        try:
            await self._conn.executemany(query, args, **kwargs)
        except BaseException as exc:
            self._failed(exc)
            raise

    async def defer(self, query: str, *args: Any) -> None:
        """``execute`` whose status the handler does not read (docs/handlers.md, "Deferred
        statements"). Inside a savepoint it is sent now. In an optimistic run it is queued
        and sent before the next statement on this connection (so reads see it) or with the
        batch's writes, consecutive ones of one text as one pipelined ``executemany``; an
        error then rolls the batch back and it runs again with savepoints, where this call
        sends it at once and its error is this handler's."""
        if not self.deferring:
            await self.execute(query, *args)
            return
        guard.check(query)
        self.deferred.append((query, args))

    async def send(self) -> None:
        """Send the queued statements, in order; a failure is noted like any statement's."""
        if not self.deferred:
            return
        queued, self.deferred, self.mark = self.deferred, [], 0
        self.used = True
        try:
            i = 0
            while i < len(queued):
                query = queued[i][0]
                j = i + 1
                while j < len(queued) and queued[j][0] == query:
                    j += 1
                if j - i == 1:
                    await self._conn.execute(query, *queued[i][1])
                else:  # asyncpg pipelines executemany: one Sync for all the rows
                    await self._conn.executemany(query, [a for _, a in queued[i:j]])
                i = j
        except BaseException as exc:
            self._failed(exc)
            raise

    def __getattr__(self, name: str) -> Any:
        # Not followed: it may have sent anything. An optimistic run that gets here falls
        # back (clean is False), so a statement of it that ran before queued ones is undone.
        self.clean, self.used = False, True
        attr = getattr(self._conn, name)
        if name not in _QUERY_METHODS:
            return attr

        def checked(query: object, *args: Any, **kwargs: Any) -> Any:
            guard.check(query)
            return attr(query, *args, **kwargs)

        return checked


class PgTx:
    """BatchTx on an asyncpg connection that is inside a transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.db: Database = _Watched(conn)
        self._release_pending = False
        # Unguessable, and not on ctx: no savepoint a handler names can shadow it (a handler's
        # own "SAVEPOINT msg" once made ROLLBACK TO stop at the handler's savepoint, keeping
        # the failed attempt's writes).
        self._sp = f"consumer_{secrets.token_hex(8)}"

    def _intact(self) -> None:
        if not self.conn.is_in_transaction():
            raise TransactionEnded(
                "the batch transaction was ended while a handler ran (COMMIT/ROLLBACK on the "
                "raw connection?); the batch is retried from its first record"
            )

    async def _exec(self, q: Query) -> None:
        await self.conn.execute(q[0], *q[1])

    async def lock_offset(self, group: str, topic: str, partition: int) -> int:
        text, args = offsets.lock(group, topic, partition)
        value = await self.conn.fetchval(text, *args)
        return int(value)

    async def claim(self, rows: Sequence[Claim]) -> set[Ident]:
        if not rows:
            return set()
        text, args = inbox.claim(rows)
        return {(r[0], r[1]) for r in await self.conn.fetch(text, *args)}

    async def records(self, idents: Sequence[Ident]) -> dict[Ident, InboxRecord]:
        if not idents:
            return {}
        text, args = inbox.records(idents)
        return {
            (r[0], r[1]): InboxRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7])
            for r in await self.conn.fetch(text, *args)
        }

    optimistic = True

    def watch(self) -> None:
        if isinstance(self.db, _Watched):
            self.db.clean, self.db.first_error, self.db.used = True, None, False
            self.db.deferring, self.db.mark = True, len(self.db.deferred)

    def drop_deferred(self) -> None:
        if isinstance(self.db, _Watched):
            del self.db.deferred[self.db.mark :]

    async def send_deferred(self) -> None:
        if isinstance(self.db, _Watched):
            await self.db.send()

    def clean(self) -> bool:
        return not isinstance(self.db, _Watched) or self.db.clean

    def touched(self) -> bool:
        return not isinstance(self.db, _Watched) or self.db.used

    async def savepoint(self) -> None:
        if isinstance(self.db, _Watched):
            await self.db.send()  # queued by optimistic runs before it: kept, in order
            self.db.clean, self.db.first_error, self.db.deferring = True, None, False
        if self._release_pending:
            # The previous message's release travels with this savepoint: one round trip
            # instead of two per message (simple-query protocol, two statements).
            self._release_pending = False
            await self.conn.execute(f"RELEASE SAVEPOINT {self._sp}; SAVEPOINT {self._sp}")
        else:
            await self.conn.execute(f"SAVEPOINT {self._sp}")

    async def rollback_savepoint(self) -> None:
        self._intact()
        await self.conn.execute(f"ROLLBACK TO SAVEPOINT {self._sp}")

    async def release_savepoint(self) -> None:
        self._intact()
        if isinstance(self.db, _Watched) and self.db.clean:
            # No statement of the handler failed, so RELEASE cannot fail: it is deferred to
            # the next savepoint(). Until then the batch's later statements run inside this
            # (successful) savepoint, which changes nothing: COMMIT, or the release of an
            # enclosing savepoint, keeps them with it, and a failure there fails the batch.
            self._release_pending = True
        else:
            # Possibly failed (say, an error the handler caught and ignored): RELEASE now, so
            # that its failure is this message's, retried and then rejected like any other.
            await self.conn.execute(f"RELEASE SAVEPOINT {self._sp}")

    async def complete(self, rows: Sequence[Completion]) -> None:
        if rows:
            await self._exec(inbox.complete(rows))

    async def unclaim(self, idents: Sequence[Ident]) -> None:
        if idents:
            await self._exec(inbox.unclaim(idents))

    async def outbox(self, rows: Sequence[OutboxRow]) -> None:
        if rows:
            text, args = outbox.insert(rows)
            await self.conn.fetch(text, *args)

    async def advance_offset(
        self, group: str, topic: str, partition: int, next_offset: int
    ) -> None:
        await self._exec(offsets.advance(group, topic, partition, next_offset))

    async def write(
        self,
        completions: Sequence[Completion],
        unclaim: Sequence[Ident],
        rows: Sequence[OutboxRow],
        position: Position | None,
    ) -> None:
        await self.send_deferred()  # the runtime sent them already; never after the outcomes
        q = flush.statement(completions, unclaim, rows, position)
        if q is not None:
            await self.conn.fetchrow(q[0], *q[1])
