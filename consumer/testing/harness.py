"""``TestApp``: run an app's handlers through the real batch protocol, without Kafka or Redis.

Each ``send`` appends a record to an in-memory Kafka and runs it through the runtime's own
:class:`~consumer.runtime.batch.BatchProcessor` (identity, hashing, leases, inbox claim,
savepoints, outcomes, outbox rows), with :class:`~consumer.dedup.leases.MemoryLeases` for
Redis and either the real ``PgTx`` on a PostgreSQL connection or ``MemoryTx`` over dicts.
Committed outbox rows are published to the in-memory Kafka, as the relay would.

The harness plays the worker's part (consumer/runtime/worker.py) without its Kafka client:
it keeps a position per partition, re-reads a partition from the failed record when a batch
stops on an indefinite failure (without sleeping the back-off), and after an injected crash
starts a new processor (new lease token) that resumes from the stored position. Stored
offsets are kept under a group of its own (``<group>.testapp-<random>``): a test must neither
wait on a live deployment's offset rows nor skip records because of its positions. Namespaces
(``<group>.<handler>``), hence inbox rows, are exactly those of the deployed app.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import asyncpg
from pydantic import BaseModel
from typing_extensions import TypeVar

from consumer import codec, keys
from consumer.app import App
from consumer.codecs.registry import Codecs, JsonCodec, MsgpackCodec
from consumer.constants import (
    CONFLICT_SUFFIX,
    CONTENT_MSGPACK,
    DLQ_SUFFIX,
    HEADER_CONTENT_TYPE,
)
from consumer.dedup.inbox import InboxRecord
from consumer.dedup.leases import MemoryLeases
from consumer.errors import TransientError
from consumer.lifespan import Lifespan
from consumer.message import Message
from consumer.observers import Observer
from consumer.probe import Probe
from consumer.runtime.batch import BatchProcessor
from consumer.runtime.cursor import next_position, process_partition
from consumer.runtime.outcomes import BatchResult, Handled
from consumer.settings import Settings, load_settings
from consumer.testing.database import Backend, Failures, HandlerDb, PostgresBackend
from consumer.testing.encoding import as_sent
from consumer.testing.kafka import MemoryKafka
from consumer.testing.result import HarnessError, SendResult
from consumer.testing.store import MemoryStore

D = TypeVar("D", default=Any)  # the app's dependency container


class _Crash(BaseException):
    # The worker process dies here. A BaseException, so that no ``except Exception`` in the
    # runtime handles it: the transaction is abandoned, leases and done markers are left as
    # they are, and nothing after this point runs, as after a SIGKILL.
    def __init__(self, point: str) -> None:
        super().__init__(point)
        self.point = point


class _Recorder(Observer):
    """Keeps what each committed transaction decided.

    A crash after the commit loses the BatchResult ``process`` would have returned; what the
    database committed is known all the same, and the harness reports it.
    """

    def __init__(self) -> None:
        self.handled: list[Handled] = []

    def committed(self, result: BatchResult) -> None:
        self.handled += result.handled

    def take(self) -> list[Handled]:
        handled, self.handled = self.handled, []
        return handled


class _Faults(Probe):
    """The harness's own fault points: counts handler calls, raises a simulated crash."""

    def __init__(self, harness: TestApp) -> None:
        self.harness = harness

    async def point(self, name: str) -> None:
        await self.harness._at(name)


def _encode(
    payload: BaseModel | Mapping[str, Any] | list[Any] | bytes, content_type: str, codecs: Codecs
) -> bytes:
    if isinstance(payload, bytes):
        return payload
    chosen = codecs.get(content_type)
    if chosen is not None and not isinstance(chosen, MsgpackCodec | JsonCodec):
        return codecs.encode(content_type, payload)  # a codec the app registered (Avro ...)
    if isinstance(payload, BaseModel):
        return codec.encode(as_sent(payload, isinstance(chosen, JsonCodec)), content_type)
    return codec.encode(dict(payload) if isinstance(payload, Mapping) else payload, content_type)


class TestApp:
    """Runs ``app``'s handlers exactly as a worker would, in memory; see the module docstring.

    ``db`` is a PostgreSQL DSN or an asyncpg connection when handlers use ``ctx.db``: the
    framework's and the app's migrations are applied, then everything the test does happens
    in one transaction that is rolled back on ``close()``. Without ``db`` the inbox, offsets
    and outbox live in dicts and ``ctx.db`` raises :class:`DatabaseRequired`.

    The app's lifespan runs as in a worker (docs/lifespan.md): its container is built and its
    startup hooks run on ``start()`` (``async with``), its shutdown hooks on ``close()``.
    ``deps=`` replaces the container for the test (``ctx.deps`` is that object), and then
    the hooks do not run unless ``lifespan=True``; ``lifespan=False`` skips them anyway.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        app: App[D],
        db: str | asyncpg.Connection | None = None,
        *,
        settings: Settings | None = None,
        migrate: bool = True,
        max_rounds: int = 100,
        deps: D | None = None,
        lifespan: bool | None = None,
    ) -> None:
        self.app = app
        # The harness never waits for a lease held elsewhere: such a lease belongs to a
        # crashed worker, and "waiting" for it is modelled as letting it expire.
        # Nothing here connects (a database, if any, is the ``db`` argument), so connection
        # settings are not required; unknown CONSUMER_* variables are still refused.
        base = settings or app.given_settings or load_settings(require_connections=False)
        self.settings = base.model_copy(update={"lease_wait_ms": 0})
        self.kafka = MemoryKafka()
        self.leases = MemoryLeases()
        self.group = f"{app.group}.testapp-{uuid.uuid4().hex[:8]}"
        self._app = copy.copy(app)
        self._app.group = self.group
        self._lifespan = Lifespan(
            self._app, deps=deps, hooks=(deps is None) if lifespan is None else lifespan
        )
        self._bound: App | None = None  # the app bound to the container, while started
        self._db = db
        self._migrate = migrate
        self._max_rounds = max_rounds
        self._backend: Backend | None = None
        self._conn: asyncpg.Connection | None = None
        self._processor: BatchProcessor | None = None
        self._recorder = _Recorder()
        self._failures = Failures()
        self._crash_at: str | None = None
        self._positions: dict[tuple[str, int], int] = {}
        self._kafka_committed: dict[tuple[str, int], int] = {}
        self._last: Message | None = None
        self._lock = asyncio.Lock()
        self.handler_calls = 0

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> TestApp:
        """Open the store (connect, migrate, begin). ``send`` calls it when needed."""
        if self._backend is None:
            if self._db is None:
                self._backend = MemoryStore()
            else:
                folders = dict(self.app.migrations) if self._migrate else None
                pg = await PostgresBackend.open(self._db, folders)
                self._backend, self._conn = pg, pg.conn
            try:
                self._bound = await self._lifespan.start()  # StartupFailed if a hook raised
            except BaseException:
                await self.close()
                raise
            self._processor = self._new_processor()
        return self

    async def close(self) -> None:
        """Run the app's shutdown hooks, roll back everything done in PostgreSQL, and close
        the connection if it is ours."""
        backend, self._backend, self._conn = self._backend, None, None
        self._bound = None
        try:
            await self._lifespan.stop()
        finally:
            if backend is not None:
                await backend.close()

    @property
    def deps(self) -> Any:
        """The container the handlers see as ``ctx.deps`` (None before ``start()``)."""
        return self._lifespan.deps

    async def __aenter__(self) -> TestApp:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _new_processor(self) -> BatchProcessor:
        backend = self._backend
        assert backend is not None
        conn = self._conn
        assert self._bound is not None
        return BatchProcessor(
            self._bound,
            self.settings,
            self.leases,
            f"testapp-{uuid.uuid4().hex[:12]}",
            lambda: backend.begin(HandlerDb(conn, self._failures)),
            probe=_Faults(self),
            observer=self._recorder,
        )

    # ---------------------------------------------------------------- sending

    async def send(
        self,
        topic: str,
        payload: BaseModel | Mapping[str, Any] | list[Any] | bytes,
        *,
        key: str | bytes | None = None,
        headers: Mapping[str, str | bytes] | None = None,
        partition: int = 0,
        content_type: str | None = CONTENT_MSGPACK,
    ) -> SendResult:
        """Append a record to ``topic`` and process it now, as a worker would.

        ``payload`` is a pydantic model or JSON-like data (encoded by ``content_type``,
        msgpack by default) or raw bytes (sent as they are). ``key`` is the Kafka record key.
        A ``content-type`` header is added unless ``headers`` has one or content_type is None.
        """
        raw_headers = [
            (n, v.encode() if isinstance(v, str) else v) for n, v in (headers or {}).items()
        ]
        if content_type and not any(n.lower() == HEADER_CONTENT_TYPE for n, _ in raw_headers):
            raw_headers.append((HEADER_CONTENT_TYPE, content_type.encode()))
        value = _encode(payload, content_type or CONTENT_MSGPACK, self.app.codecs)
        raw_key = key.encode() if isinstance(key, str) else key
        async with self._lock:
            await self.start()
            msg = self.kafka.append(
                topic, value, key=raw_key, headers=raw_headers, partition=partition
            )
            return await self._deliver(msg)

    async def send_batch(
        self,
        topic: str,
        payloads: Sequence[BaseModel | Mapping[str, Any] | list[Any] | bytes],
        *,
        partition: int = 0,
        content_type: str = CONTENT_MSGPACK,
    ) -> list[SendResult]:
        """Append ``payloads`` to ``topic`` at once, then process them as a worker that read
        them in one fetch: one batch (how a batch handler gets more than one message). One
        result per record; they share ``handled``, ``published`` and ``handler_calls``."""
        headers = [(HEADER_CONTENT_TYPE, content_type.encode())]
        async with self._lock:
            await self.start()
            msgs = [
                self.kafka.append(
                    topic,
                    _encode(p, content_type, self.app.codecs),
                    headers=headers,
                    partition=partition,
                )
                for p in payloads
            ]
            if not msgs:
                raise HarnessError("send_batch(): no payloads")
            out = await self._deliver(msgs[-1])
        return [dataclasses.replace(out, message=m) for m in msgs]

    async def redeliver(
        self, *, partition: int | None = None, same_offset: bool = False
    ) -> SendResult:
        """Deliver the last sent record again.

        By default as a new record with the same key, value and headers (a producer retry, a
        resent request, a copy on ``partition``): it goes through the dedup checks and comes
        back ``DUPLICATE`` (or ``CONFLICT``). With ``same_offset=True`` the very same record is
        read again, as Kafka does after a crash before its offset commit: the stored position
        is already past it, so it is ``SKIPPED`` without looking at the inbox.
        """
        async with self._lock:
            last = self._last
            if last is None:
                raise HarnessError("redeliver(): nothing was sent yet")
            if same_offset:
                if partition not in (None, last.partition):
                    raise HarnessError("redeliver(same_offset=True) cannot change the partition")
                self._positions[(last.topic, last.partition)] = last.offset
                msg = last
            else:
                msg = self.kafka.append(
                    last.topic,
                    last.value,
                    key=last.key,
                    headers=last.headers,
                    partition=last.partition if partition is None else partition,
                )
            return await self._deliver(msg)

    async def _deliver(self, msg: Message) -> SendResult:
        self._last = msg
        out = SendResult(msg)
        calls = self.handler_calls
        try:
            await self._drain(msg.topic, msg.partition, out)
        finally:
            out.handler_calls = self.handler_calls - calls
        out.handling  # noqa: B018 - raises HarnessError now rather than at first use
        return out

    async def _drain(self, topic: str, partition: int, out: SendResult) -> None:
        """Process the partition from its position to its end, retrying like the worker."""
        tp = (topic, partition)
        self._positions.setdefault(tp, 0)  # known to _restart() from the first batch on
        error = ""
        for _ in range(self._max_rounds):
            records = self.kafka.read(topic, partition, self._positions.get(tp, 0))
            if not records:
                return
            processor = self._processor
            assert processor is not None
            try:
                # The worker's own batching rule (runtime/cursor.py), in one transaction here.
                (batch,) = await process_partition(processor, records, len(records))
            except _Crash as crash:
                out.crashed = crash.point
                await self._restart()
                continue
            finally:
                out.handled += self._recorder.take()
                self._relay(out)
            if batch.next_offset is not None:
                self._kafka_committed[tp] = batch.next_offset
            nxt = next_position(batch, records[-1].offset)
            self._positions[tp] = nxt.offset if nxt.offset is not None else self._positions[tp]
            if batch.retry_offset is None:
                continue
            error = batch.error
            out.retry_delays_s.append(batch.retry_delay_s)
            self._expire_foreign_leases()
        raise HarnessError(
            f"{topic}/{partition} still retrying after {self._max_rounds} rounds: {error}"
        )

    def _relay(self, out: SendResult) -> None:
        assert self._backend is not None
        for row in self._backend.take_committed():
            out.published.append(self.kafka.publish(row))

    def _expire_foreign_leases(self) -> None:
        # Leases not held by the live processor belong to crashed workers; the worker's retry
        # would find them expired after lease_ms. The harness skips the wait.
        assert self._processor is not None
        token = self._processor.token
        for ident, (owner, _) in list(self.leases.leases.items()):
            if owner != token:
                del self.leases.leases[ident]

    async def _restart(self) -> None:
        # A new worker process: new token, no in-flight state or attempt counts; leases and
        # done markers of the dead one stay in "Redis". It seeks to the stored positions
        # (else Kafka's committed offset), as Worker.seek_to_stored does.
        assert self._backend is not None
        self._processor = self._new_processor()
        for tp in self._positions:
            stored = await self._backend.stored_offset(self.group, *tp)
            self._positions[tp] = stored if stored is not None else self._kafka_committed.get(tp, 0)

    async def _at(self, point: str) -> None:
        if point == "mid_handler":  # the handler is about to run
            self.handler_calls += 1
        if self._crash_at == point:
            self._crash_at = None
            raise _Crash(point)

    # ---------------------------------------------------------------- fault injection

    def crash_after_commit(self) -> None:
        """The next batch commits, then its worker dies before done markers, lease release and
        the Kafka commit. A new worker takes over: nothing may be applied twice."""
        self._crash_at = "after_commit"

    def crash_before_commit(self) -> None:
        """The next batch runs its handlers, then its worker dies before the commit: nothing it
        did in the database survives, and the record is delivered again to a new worker."""
        self._crash_at = "before_commit"

    def expire_lease(self) -> None:
        """Every lease now held expires, as if ``lease_ms`` had passed."""
        self.leases.expire_leases()

    def flush_redis(self) -> None:
        """Redis loses every key (restart, failover, eviction): PostgreSQL must still decide."""
        self.leases.flush()

    def fail_next_db_call(
        self, error: BaseException | type[BaseException] = TransientError, *, times: int = 1
    ) -> None:
        """The next ``times`` calls a handler makes on ``ctx.db`` raise ``error``.

        The runtime classifies it as it would a real one: a retriable error (the default,
        TransientError) rolls the message back and retries it, up to ``max_attempts``.
        """
        if self._db is None:
            raise HarnessError("fail_next_db_call() needs TestApp(app, db=...): no handler db here")
        self._failures.arm(error, times)

    # ---------------------------------------------------------------- assertions

    def published(self, topic: str) -> list[Message]:
        """Every message on ``topic`` in the in-memory Kafka, in the order it arrived."""
        return self.kafka.messages(topic)

    def dead_letters(self, topic: str) -> list[Message]:
        """Dead letters of records consumed from ``topic`` (its ``.dlq`` topic)."""
        return self.kafka.messages(topic + DLQ_SUFFIX)

    def conflicts(self, topic: str) -> list[Message]:
        """Conflicts (key reused with another payload) on ``topic`` (its ``.conflicts`` topic)."""
        return self.kafka.messages(topic + CONFLICT_SUFFIX)

    async def inbox(self, topic: str, key: str, *, tenant: str | None = None) -> InboxRecord | None:
        """The inbox record of ``key`` for the handler of ``topic``, or None."""
        handler = self.app.handler_for(topic)
        if handler is None:
            raise HarnessError(f"no handler for topic {topic!r}")
        await self.start()
        assert self._backend is not None
        return await self._backend.record(keys.namespace(handler.name, tenant), key)

    @property
    def db(self) -> asyncpg.Connection:
        """The connection the handlers use: query it to assert on their effects."""
        if self._conn is None:
            raise HarnessError("this TestApp has no database (or is not started)")
        return self._conn
