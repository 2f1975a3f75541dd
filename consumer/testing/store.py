"""The batch transaction over Python dicts: inbox, stored offsets and outbox without PostgreSQL.

:class:`MemoryTx` implements the :class:`consumer.db.tx.BatchTx` contract with the semantics
the runtime relies on: a transaction works on a copy and replaces the committed state only
when it ends without an exception; savepoints snapshot and restore; a claim inserts a
``pending`` row only where none exists; the stored offset only moves forward; results go
through JSON exactly as they do through ``jsonb``. Transactions are serialised (one at a
time), which is what the primary key and the offset row lock make of conflicting ones in
PostgreSQL. The contract suite in tests/contract/ holds this module to PgTx's behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from consumer.context import Database
from consumer.dedup.hashing import HASH_VERSION
from consumer.dedup.inbox import Claim, Completion, InboxRecord
from consumer.outbox.store import OutboxRow
from consumer.types import Ident, RecordStatus


@dataclass(frozen=True, slots=True)
class InboxRow:
    """One ``dedup.inbox`` row."""

    hash: str
    status: RecordStatus
    topic: str
    partition: int
    offset: int
    result: Any = None
    reason: str | None = None
    hash_version: int = HASH_VERSION  # as dedup.inbox.hash_version
    reply_type: str | None = None  # as dedup.inbox.reply_type


@dataclass
class _State:
    inbox: dict[Ident, InboxRow] = field(default_factory=dict)
    offsets: dict[tuple[str, str, int], int] = field(default_factory=dict)
    outbox: list[OutboxRow] = field(default_factory=list)

    def copy(self) -> _State:
        # Rows are immutable, so copying the containers is a full snapshot.
        return _State(dict(self.inbox), dict(self.offsets), list(self.outbox))


class MemoryTx:
    """BatchTx on a private copy of the store's state; see the module docstring."""

    def __init__(self, state: _State, db: Database) -> None:
        self.state = state
        self.db = db
        self._savepoint: _State | None = None

    async def lock_offset(self, group: str, topic: str, partition: int) -> int:
        return self.state.offsets.setdefault((group, topic, partition), -1)

    async def claim(self, rows: Sequence[Claim]) -> set[Ident]:
        claimed: set[Ident] = set()
        for r in sorted(rows, key=lambda r: (r.namespace, r.key)):
            ident = (r.namespace, r.key)
            if ident not in self.state.inbox:
                self.state.inbox[ident] = InboxRow(
                    r.hash, "pending", r.topic, r.partition, r.offset
                )
                claimed.add(ident)
        return claimed

    async def records(self, idents: Sequence[Ident]) -> dict[Ident, InboxRecord]:
        out: dict[Ident, InboxRecord] = {}
        for ident in idents:
            row = self.state.inbox.get(ident)
            if row is not None:
                out[ident] = InboxRecord(
                    *ident,
                    row.hash,
                    row.status,
                    row.result,
                    row.reason,
                    row.hash_version,
                    row.reply_type,
                )
        return out

    optimistic = False  # the harness runs every handler in its savepoint: exact call counts

    def watch(self) -> None:
        pass

    def clean(self) -> bool:
        return True

    def touched(self) -> bool:
        return True  # never optimistic: the question does not arise

    def drop_deferred(self) -> None:
        pass  # never optimistic: ctx.db.defer sends at once

    async def send_deferred(self) -> None:
        pass

    async def savepoint(self) -> None:
        self._savepoint = self.state.copy()

    async def rollback_savepoint(self) -> None:
        if self._savepoint is None:
            raise RuntimeError("ROLLBACK TO SAVEPOINT without a savepoint")
        # The savepoint stays established after a rollback to it, as in PostgreSQL.
        self.state = self._savepoint.copy()

    async def release_savepoint(self) -> None:
        if self._savepoint is None:
            raise RuntimeError("RELEASE SAVEPOINT without a savepoint")
        self._savepoint = None

    async def complete(self, rows: Sequence[Completion]) -> None:
        for c in rows:
            ident = (c.namespace, c.key)
            row = self.state.inbox.get(ident)
            if row is None or row.status != "pending":
                continue  # as the SQL: only rows this transaction claimed
            # Through JSON, as jsonb does: a tuple comes back a list, an int key a string.
            result = json.loads(c.result_json) if c.result_json is not None else None
            # Completion.status is typed str until the runtime's is a RecordStatus (the SQL's
            # CHECK refuses anything else; the runtime writes only "done" and "rejected").
            status = cast(RecordStatus, c.status)
            self.state.inbox[ident] = replace(
                row, status=status, result=result, reason=c.reason, reply_type=c.reply_type
            )

    async def unclaim(self, idents: Sequence[Ident]) -> None:
        for ident in idents:
            row = self.state.inbox.get(ident)
            if row is not None and row.status == "pending":
                del self.state.inbox[ident]

    async def outbox(self, rows: Sequence[OutboxRow]) -> None:
        self.state.outbox.extend(rows)

    async def advance_offset(
        self, group: str, topic: str, partition: int, next_offset: int
    ) -> None:
        pos = (group, topic, partition)
        if self.state.offsets.get(pos, -1) < next_offset:
            self.state.offsets[pos] = next_offset

    async def write(
        self,
        completions: Sequence[Completion],
        unclaim: Sequence[Ident],
        rows: Sequence[OutboxRow],
        position: tuple[str, str, int, int] | None,
    ) -> None:
        await self.complete(completions)
        await self.unclaim(unclaim)
        await self.outbox(rows)
        if position is not None:
            await self.advance_offset(*position)


class MemoryStore:
    """The committed state, and transactions on it. The harness's database when it has none."""

    def __init__(self) -> None:
        self.state = _State()
        self._lock = asyncio.Lock()
        self._relayed = 0

    @contextlib.asynccontextmanager
    async def begin(self, db: Database) -> AsyncIterator[MemoryTx]:
        """One transaction: commits when the block ends normally, else leaves no trace."""
        async with self._lock:
            tx = MemoryTx(self.state.copy(), db)
            yield tx
            self.state = tx.state

    def take_committed(self) -> list[OutboxRow]:
        """Outbox rows committed since the last call, in commit order (what a relay publishes)."""
        rows = self.state.outbox[self._relayed :]
        self._relayed = len(self.state.outbox)
        return rows

    async def stored_offset(self, group: str, topic: str, partition: int) -> int | None:
        pos = self.state.offsets.get((group, topic, partition), -1)
        return pos if pos >= 0 else None

    async def record(self, namespace: str, key: str) -> InboxRecord | None:
        row = self.state.inbox.get((namespace, key))
        if row is None:
            return None
        return InboxRecord(
            namespace,
            key,
            row.hash,
            row.status,
            row.result,
            row.reason,
            row.hash_version,
            row.reply_type,
        )

    async def close(self) -> None:
        return None
