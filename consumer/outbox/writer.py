"""Outbox rows from application code: a web endpoint's event, in the caller's own transaction.

A handler publishes with ``ctx.publish``; anything else (an HTTP handler, a script, a cron
job) that changes the database and must announce it uses :class:`Outbox` on the connection
of its own transaction::

    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO orders ...", order_id, ...)
        await Outbox(conn, source="orders-api").publish(
            "order.created", OrderCreated(...), key=order_id, idempotency_key=order_id
        )

The row is written at once, by the statement a batch uses (consumer/outbox/store.py
``insert``), with the envelope a handler's event gets (consumer/outbox/envelopes.py
``written``); it commits with the order or not at all, and its ``pg_notify`` wakes the relay
only on commit. This is NServiceBus's transactional session and MassTransit's bus outbox
(https://docs.particular.net/nservicebus/transactional-session/,
https://masstransit.io/documentation/patterns/transactional-outbox), with the caller's own
transaction instead of a session object: the connection is the unit of work.

asyncpg connections (and pool proxies) and psycopg 3 ``AsyncConnection`` are accepted.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from consumer import keys, storable
from consumer.constants import CONTENT_MSGPACK
from consumer.context import outgoing
from consumer.errors import ConsumerError
from consumer.outbox import envelopes, store
from consumer.types import Query


class OutboxError(ConsumerError):
    """An outbox row cannot be written here: no open transaction, or not a connection this
    knows. Nothing was written."""


_PLACEHOLDER = re.compile(r"\$(\d+)")


def _psycopg(query: Query) -> tuple[str, list[Any]]:
    # store.py writes asyncpg's $n placeholders; psycopg takes %s in order. A literal % in the
    # text would be read as a placeholder by psycopg, so it is doubled first.
    text, args = query
    order = [int(n) for n in _PLACEHOLDER.findall(text)]
    return _PLACEHOLDER.sub("%s", text.replace("%", "%%")), [args[n - 1] for n in order]


def _kind(conn: Any) -> str:
    """``asyncpg`` or ``psycopg``, from what the connection offers (a pool's proxy too)."""
    if callable(getattr(conn, "is_in_transaction", None)) and hasattr(conn, "fetch"):
        return "asyncpg"
    info = getattr(conn, "info", None)
    if info is not None and hasattr(info, "transaction_status") and hasattr(conn, "execute"):
        return "psycopg"
    raise OutboxError(
        f"Outbox needs an asyncpg connection or a psycopg AsyncConnection, not "
        f"{type(conn).__name__} (inside a handler, use ctx.publish)"
    )


def _in_transaction(conn: Any, kind: str) -> bool:
    if kind == "asyncpg":
        return bool(conn.is_in_transaction())
    from psycopg.pq import TransactionStatus

    # INTRANS only: IDLE would make psycopg open a transaction of its own (or, in autocommit,
    # none at all), and INERROR is a transaction that can only roll back.
    return bool(conn.info.transaction_status == TransactionStatus.INTRANS)


def _key_problem(key: object) -> str | None:
    """Why ``key`` cannot be a message's idempotency key, or None (the rules a consumer
    applies to the key it reads back, consumer/dedup/identity.py)."""
    if not isinstance(key, str):
        return "must be text"
    if not key:
        return "is empty (leave it out, None, for a fresh key)"
    if not storable.text_ok(key):
        return "contains NUL or a lone surrogate"
    return None


class Outbox:
    """Writes outbox rows inside the caller's open PostgreSQL transaction.

    ``source`` names the writer (a service, like a handler's name): it scopes the
    idempotency keys (``<source>:<key>``) and is the rows' ``x-source``. It follows the
    rules of a handler name (consumer/keys.py).
    """

    def __init__(self, conn: Any, *, source: str) -> None:
        problem = keys.name_problem(source)
        if problem is not None:
            raise ValueError(f"outbox source {source!r} {problem}")
        self._conn = conn
        self._kind = _kind(conn)
        self.source = source

    async def publish(
        self,
        topic: str,
        payload: BaseModel | Mapping[str, Any],
        *,
        key: str | bytes | None = None,
        idempotency_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        content_type: str = CONTENT_MSGPACK,
    ) -> str:
        """Write ``payload`` for ``topic`` as an outbox row of the open transaction.

        The relay publishes it after the commit, in the order of the calls for one (topic,
        key), at least once; every copy carries the same ``idempotency-key``, returned here.
        ``idempotency_key``: the message's own name (an order id, a client's
        ``Idempotency-Key``); give it whenever a retry of the same request could publish
        again, so a downstream consumer drops the second. Without it, a fresh UUID. Use a
        distinct key for each message of one transaction: a downstream consumer keyed by
        the header applies one message per key.

        Raises :class:`OutboxError` outside a transaction, ValueError for a bad topic,
        content type, header or size; nothing is written then.
        """
        if not _in_transaction(self._conn, self._kind):
            raise OutboxError(
                "Outbox.publish needs an open transaction on its connection "
                "(`async with conn.transaction():`): a row written outside one would be "
                "published even if the changes it announces were never committed"
            )
        if idempotency_key is not None and (problem := _key_problem(idempotency_key)):
            # Refused here, not by PostgreSQL: a NUL would abort the caller's transaction.
            # And "" is not "no key": a fresh UUID for it would make every retry of the
            # request another event, applied again downstream.
            raise ValueError(f"idempotency_key {idempotency_key!r} {problem}")
        item = outgoing(topic, payload, key=key, headers=headers, content_type=content_type)
        key_text = uuid.uuid4().hex if idempotency_key is None else idempotency_key
        row = envelopes.written(self.source, key_text, item)
        if (size := envelopes.row_size(row)) > envelopes.MAX_ROW_BYTES:
            # The relay's producer would refuse it on every tick and hold back its key.
            raise ValueError(
                f"the message to {topic!r} is {size} bytes, more than the relay can send "
                f"({envelopes.MAX_ROW_BYTES})"
            )
        query = store.insert([row])
        if self._kind == "asyncpg":
            await self._conn.fetch(query[0], *query[1])
        else:
            text, args = _psycopg(query)
            await self._conn.execute(text, args)
        return row.idempotency_key
