"""Batch handlers: one call for the new messages of a partition batch, set-based work inside.

``@app.batch_handler(...)`` returns a :class:`BatchHandler`: a :class:`~consumer.Handler` (same
options, same identity, same outcome table) whose function takes ``(batch: list[Item[M]],
ctx: BatchContext)``. The runtime (consumer/runtime/batch_run.py) calls it once per batch
transaction with exactly the records the protocol would run (decoded, validated, deduplicated,
coalesced and claimed), inside one savepoint, and records each item's outcome as for a
per-message handler. When that call cannot give an exact outcome for every item (it raised,
timed out, or marked an item :class:`~consumer.Retry`), it is rolled back and the items are run
one at a time, each in its own savepoint, through :meth:`BatchHandler.call`: the function with a
one-element list, on the per-message path (consumer/runtime/invoke.py).

This module never touches a store: it adapts a batch function to the per-message contract and
reads a batch call's return value into one verdict per item.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Generic

from pydantic import BaseModel
from typing_extensions import TypeVar

from consumer import keys
from consumer.constants import CONTENT_MSGPACK
from consumer.context import Context, Database, Outgoing
from consumer.errors import ConfigError, Reject, Retry
from consumer.handler import Handler
from consumer.message import Message

M = TypeVar("M", bound=BaseModel)
D = TypeVar("D", default=Any)  # the app's dependency container, as Context's

Payload = BaseModel | Mapping[str, Any]


@dataclass(frozen=True, slots=True, eq=False)
class Item(Generic[M]):
    """One new message of a batch: its validated payload, its identity, and its attempt."""

    payload: M
    key: str  # the idempotency key
    namespace: str  # the handler's namespace, with ``@tenant`` when there is one
    message: Message
    attempt: int  # runs of this message so far, this one included (1 on the first)
    payload_hash: str
    index: int  # its position in the batch the handler was given

    @property
    def outside_key(self) -> str:
        """The idempotency key to give an outside system, as ``Context.outside_key``."""
        return keys.outside_key(self.namespace, self.key)


Verdict = Any  # a value (the item's result), a Reject or a Retry


@dataclass
class BatchContext(Generic[D]):
    """What a batch handler sees: the batch transaction's connection, publish, and verdicts.

    ``publish`` adds an outbox row on behalf of one item: it commits with that item's outcome
    and is dropped if the item is rejected (its ``db`` writes are not: see docs/handlers.md,
    "Batch handlers"). ``deps`` is the app's dependency container, as ``Context.deps``.
    """

    db: Database
    items: list[Item[Any]]
    deps: D = None  # type: ignore[assignment]
    _outgoing: dict[int, list[Outgoing]] = field(default_factory=dict)
    _marked: dict[int, Reject | Retry] = field(default_factory=dict)

    def _check(self, item: Item[Any]) -> int:
        i = item.index
        if not (0 <= i < len(self.items) and self.items[i] is item):
            raise ValueError("the item is not one of this batch's (a copy, or another batch's?)")
        return i

    def publish(
        self,
        item: Item[Any],
        topic: str,
        payload: Payload,
        *,
        key: str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        content_type: str = CONTENT_MSGPACK,
    ) -> None:
        """Publish ``payload`` to ``topic`` through the outbox, on behalf of ``item``."""
        # Context.publish validates and encodes; its list is the item's outgoing messages.
        one = Context(self.db, item.namespace, item.key, item.message, item.payload_hash)
        one.outgoing = self._outgoing.setdefault(self._check(item), [])
        one.publish(topic, payload, key=key, headers=headers, content_type=content_type)

    def publish_many(
        self,
        topic: str,
        items: Iterable[Item[M]],
        payload: Callable[[Item[M]], Payload],
        *,
        key: Callable[[Item[M]], str | bytes | None] | None = None,
        headers: Mapping[str, str] | None = None,
        content_type: str = CONTENT_MSGPACK,
    ) -> None:
        """One message to ``topic`` per item: ``payload(item)``, keyed by ``key(item)``."""
        for it in items:
            k = key(it) if key is not None else None
            self.publish(it, topic, payload(it), key=k, headers=headers, content_type=content_type)

    def reject(self, item: Item[Any], reason: object = None) -> None:
        """Mark ``item`` rejected (definite): recorded as ``rejected``, dead-lettered."""
        self._marked[self._check(item)] = Reject(reason)

    def retry(self, item: Item[Any], *, delay_s: float | None = None, reason: str = "") -> None:
        """Mark ``item`` for a retry (transient): the batch falls back to one run per item."""
        self._marked[self._check(item)] = Retry(delay_s=delay_s, reason=reason)

    def outgoing(self, item: Item[Any]) -> list[Outgoing]:
        """What was published on behalf of ``item`` (for the runtime)."""
        return self._outgoing.get(item.index, [])


def verdicts(ctx: BatchContext, value: object) -> list[Verdict]:
    """One verdict per item from a batch call's return ``value`` and the marks on ``ctx``.

    ``value``: None (every result None), a list or tuple aligned with the batch, or a mapping
    from idempotency key to result covering every item. An entry may be a ``Reject`` or a
    ``Retry`` instance. A mark (``ctx.reject``/``ctx.retry``) wins over the entry; ``Retry``
    wins over ``Reject``. Anything else is the handler's bug: ``TypeError``.
    """
    items = ctx.items
    entries: list[Any]
    if value is None:
        entries = [None] * len(items)
    elif isinstance(value, (list, tuple)):
        if len(value) != len(items):
            raise TypeError(f"a batch handler returned {len(value)} results for {len(items)} items")
        entries = list(value)
    elif isinstance(value, Mapping):
        by_key = {it.key for it in items}
        if len(by_key) != len(items):
            raise TypeError("a batch with two tenants' copies of one key needs a list result")
        if set(value) != by_key:
            raise TypeError("a batch handler's dict result must have exactly its items' keys")
        entries = [value[it.key] for it in items]
    else:
        raise TypeError(
            "a batch handler returns None, a list aligned with its batch or a dict by key, "
            f"not {type(value).__name__}"
        )
    out: list[Verdict] = []
    for i, entry in enumerate(entries):
        mark = ctx._marked.get(i)
        retry = next((v for v in (mark, entry) if isinstance(v, Retry)), None)
        out.append(retry if retry is not None else mark if mark is not None else entry)
    return out


BatchFn = Callable[[list[Item[M]], BatchContext[D]], Awaitable[Any]]


@dataclass(eq=False)
class BatchHandler(Handler[M, Any]):
    """A handler whose function takes the batch's new messages at once; see the module doc."""

    async def call(self, payload: M, ctx: Context) -> Any:
        """One message alone (the per-message path): the function with a one-element list."""
        one: Item[M] = Item(
            payload,
            ctx.idempotency_key,
            ctx.namespace,
            ctx.message,
            ctx.attempt,
            ctx.payload_hash,
            0,
        )
        bctx: BatchContext[Any] = BatchContext(ctx.db, [one], ctx.deps)
        value = await self.fn([one], bctx)
        [verdict] = verdicts(bctx, value)
        if isinstance(verdict, (Reject, Retry)):
            raise verdict
        ctx.outgoing.extend(bctx.outgoing(one))
        return verdict


def as_batch_handler(h: Handler[M, Any]) -> BatchHandler[M]:
    """The batch handler of ``h`` (built and checked by ``make_handler``)."""
    if not h.is_async:
        raise ConfigError(f"@batch_handler on {h.fn.__name__}: the function must be async def")
    return BatchHandler(**{f.name: getattr(h, f.name) for f in fields(h)})
