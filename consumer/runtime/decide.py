"""What to do with one record of a batch, given what the stores said: a pure function.

``decide(item, view)`` is the outcome table of docs/handlers.md ("What a copy gets") in code,
and nothing else: no I/O, no clock, no mutation. The transaction (runtime/transaction.py)
builds the :class:`View` from one claim and one lookup, then walks the batch calling
``decide`` once per record and one arm per :class:`Decision`; the arms update the view (a run
that succeeded makes the key known, one that failed makes its later copies ``FAILED_COPY``).
Unit-tested row by row in tests/unit/test_decide.py (docs/design.md, "Decide, then write").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from consumer.dedup.hashing import HASH_VERSION
from consumer.dedup.identity import Identity
from consumer.types import Ident


class Decision(StrEnum):
    INVALID = "invalid"  # never reaches a handler: a dead letter, nothing recorded
    FAILED_COPY = "failed_copy"  # a copy of a key whose run failed in this batch: same fate
    RUN = "run"  # claimed here, nothing recorded: the handler runs
    DUPLICATE = "duplicate"  # recorded with the same payload: the stored answer again
    CONFLICT = "conflict"  # recorded with another payload: never applied
    WAIT = "wait"  # in flight elsewhere, or the record is unreadable: stop here, retry later
    HALT = "halt"  # a `pending` record committed behind the guard: stop for an operator


@dataclass(slots=True)
class Known:
    """What the stores say about a key: status, hash and (when read from PostgreSQL) result."""

    status: str
    hash: str
    result: Any = None
    reason: str | None = None
    has_result: bool = False
    version: int = HASH_VERSION  # the canonical-form version ``hash`` was made with
    reply_type: str | None = None  # every reply's content type (None: msgpack, runtime/replies.py)


@dataclass(slots=True)
class View:
    """What one batch transaction knows about its keys, as it walks the records."""

    known: dict[Ident, Known] = field(default_factory=dict)  # records, read or just written
    claimed: set[Ident] = field(default_factory=set)  # inbox rows this transaction inserted
    busy: set[Ident] = field(default_factory=set)  # leased elsewhere after the bounded wait
    processed: set[Ident] = field(default_factory=set)  # runs that ended done or rejected
    failed: dict[Ident, tuple[str, str]] = field(default_factory=dict)  # x-reason, detail

    def same_payload(self, ident: Identity) -> bool | None:
        """Whether ``ident``'s payload is the recorded one (None: no record it can compare
        with: none, or one made with a canonical-form version this release does not know)."""
        k = self.known.get(ident.ident)
        return None if k is None else ident.same_payload(k.hash, k.version)


def decide(ident: Identity | None, view: View) -> Decision:
    """The decision for a record identified as ``ident`` (None: it could not be)."""
    if ident is None:
        return Decision.INVALID
    i = ident.ident
    same = view.same_payload(ident)
    # A record made with a canonical-form version this release does not know compares with
    # nothing: as if there were none (and, not being claimed here, it waits).
    k = view.known.get(i) if same is not None else None
    if k is not None and k.status == "pending":
        return Decision.HALT
    if i in view.failed:
        return Decision.FAILED_COPY
    if k is None:
        return Decision.RUN if i in view.claimed and i not in view.processed else Decision.WAIT
    return Decision.DUPLICATE if same else Decision.CONFLICT


def wait_reason(ident: Ident, view: View) -> str:
    """Why a ``WAIT`` waits, for the log line and the retry's error."""
    if ident in view.busy:
        return "lease held by another worker"
    if ident in view.known:
        return "stored hash made with an unknown canonical-form version (a newer release wrote it)"
    return "inbox record changed under the batch"
