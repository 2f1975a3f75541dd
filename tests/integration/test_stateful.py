"""A hypothesis state machine driving the real batch protocol on PostgreSQL and Redis.

The machine plays Kafka (two partition logs, a consumer position and a Kafka-committed
position per partition) and a worker that crashes and restarts. Its steps: deliver a new
message, redeliver from the Kafka-committed position, resend a copy of an earlier message,
reuse a key with another payload, transient handler failures, crashes before and after the
commit (a crash leaves its leases behind), lease expiry and Redis losing the test's keys.

After every step the stores must show: at most one effect per key, effects exactly where the
inbox says "done" and with the recorded hash, no conflicting payload ever applied, no key
recorded by a run that failed indefinitely, no pending inbox row, positions never moving back.
At the end, with the leases expired, every key that was delivered is decided.

The effects table has no unique constraint, so a second effect would be a second row.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import asyncpg
import msgpack
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pydantic import BaseModel

from consumer import App, Context, Reject, Settings
from consumer.db.pool import _init as init_connection
from consumer.db.tx import BatchTx, PgTx
from consumer.dedup.leases import RedisLeases
from consumer.message import Message
from consumer.runtime.batch import BatchProcessor
from consumer.runtime.outcomes import Outcome
from consumer.testing.faults import Calling
from tests.conftest import app_settings
from tests.integration.dedup_support import redis_keys

pytestmark = pytest.mark.integration

T = TypeVar("T")
KEYS = ("a", "b", "c", "d")
AMOUNTS = (5, 7, -1)  # -1: the handler rejects it (a definite failure)
PARTITIONS = (0, 1)
MAX_EXAMPLES = int(os.environ.get("STATEFUL_EXAMPLES", "60"))
STEPS = int(os.environ.get("STATEFUL_STEPS", "40"))


class Item(BaseModel):
    id: str
    amount: int
    note: str = ""  # excluded from the hash: copies differing only here are duplicates


class Crash(BaseException):
    """The process dies at a fault point: nothing after it runs (no lease release)."""


class StoreMachine(RuleBasedStateMachine):
    base_settings: Settings
    table: str
    tally: Counter[str]  # what the runs exercised, so an empty run cannot pass

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        unique = uuid.uuid4().hex[:10]
        self.group = f"st-{unique}"
        self.topic = f"st-{unique}"
        self.ns = f"{self.group}.handle"
        self.settings = self.base_settings.model_copy(
            update={
                "lease_ms": 60_000,  # leases of a crashed worker go only when a step expires them
                "lease_wait_ms": 20,
                "retry_backoff_ms": 0,
                "max_attempts": 1_000,  # transient failures here are never exhausted
                "redis_retry_s": 0.01,
            }
        )
        self.conn: asyncpg.Connection = self.run(asyncpg.connect(self.settings.postgres_dsn))
        self.run(init_connection(self.conn))
        self.leases = RedisLeases(self.settings.redis_url)
        self.log: dict[int, list[Message]] = {p: [] for p in PARTITIONS}
        self.position: dict[int, int] = dict.fromkeys(PARTITIONS, 0)
        self.kafka_committed: dict[int, int] = dict.fromkeys(PARTITIONS, 0)
        self.max_stored: dict[int, int] = dict.fromkeys(PARTITIONS, -1)
        self.flaky: set[str] = set()  # the next handler run for these keys fails transiently
        self.finished: set[str] = set()  # keys whose handler ran to the end (return or Reject)
        self.conflicts: list[tuple[str, str]] = []
        self.delivered: set[str] = set()
        self.armed: tuple[str, BaseException] | None = None
        self.crashes = 0
        self.app = self._app()
        self.processor = self._processor()

    # ------------------------------------------------------------ plumbing

    def run(self, aw: Awaitable[T]) -> T:
        return self.loop.run_until_complete(aw)

    def _app(self) -> App:
        app = App(self.group, settings=self.settings)
        table, machine = self.table, self

        @app.handler(self.topic, schema=Item, key=lambda p: p.id, hash_exclude={"note"})
        async def handle(p: Item, ctx: Context) -> int:
            await ctx.db.execute(
                f"INSERT INTO {table} (ns, k, h) VALUES ($1, $2, $3)",
                ctx.namespace,
                p.id,
                ctx.payload_hash,
            )
            if p.id in machine.flaky:
                machine.flaky.discard(p.id)
                raise ConnectionResetError("transient")  # indefinite: rolled back, retried
            machine.finished.add(p.id)
            if p.amount < 0:
                raise Reject("negative amount")
            return p.amount

        return app

    def _processor(self) -> BatchProcessor:
        conn = self.conn

        @contextlib.asynccontextmanager
        async def begin() -> AsyncIterator[BatchTx]:
            async with conn.transaction():
                yield PgTx(conn)

        return BatchProcessor(
            self.app,
            self.settings,
            self.leases,
            f"w-{uuid.uuid4().hex[:8]}",
            begin,
            probe=Calling(self._fault),
        )

    async def _fault(self, point: str) -> None:
        if self.armed is not None and self.armed[0] == point:
            _, exc = self.armed
            self.armed = None
            raise exc

    def _poll(self, p: int) -> None:
        records = self.log[p][self.position[p] :]
        if not records:
            return
        try:
            result = self.run(self.processor.process(records))
        except Crash:
            self.tally["crash"] += 1
            self._restart()
            return
        self.tally.update(h.outcome.value for h in result.handled)
        if result.retry_offset is not None:
            self.tally["retry"] += 1
        if result.retry_offset is not None:
            self.position[p] = result.retry_offset
        else:
            self.position[p] = len(self.log[p])
        if result.next_offset is not None:
            self.kafka_committed[p] = result.next_offset  # after the database commit
        for h in result.handled:
            if h.outcome is Outcome.CONFLICT:
                self.conflicts.append((h.key, h.hash))

    def _restart(self) -> None:
        """A new worker process: fresh token and memory; Kafka resumes where it was committed."""
        self.crashes += 1
        self.armed = None
        self.processor = self._processor()
        self.position = dict(self.kafka_committed)

    def _append(self, p: int, value: bytes) -> None:
        self.log[p].append(Message(self.topic, p, len(self.log[p]), None, value))

    async def _delete_redis_keys(self, prefix: str) -> None:
        # By name: SCAN over the shared Redis would take seconds. Never FLUSHALL it.
        names = [n for n in redis_keys(self.ns, list(KEYS), "") if n.startswith(prefix + ":")]
        await self.leases.redis.delete(*names)

    # ------------------------------------------------------------ steps

    @rule(
        p=st.sampled_from(PARTITIONS),
        key=st.sampled_from(KEYS),
        amount=st.sampled_from(AMOUNTS),
        note=st.text(max_size=3),
    )
    def deliver(self, p: int, key: str, amount: int, note: str) -> None:
        """A new message; with a key seen before, a duplicate or a conflict."""
        self.delivered.add(key)
        self._append(p, msgpack.packb({"id": key, "amount": amount, "note": note}))
        self._poll(p)

    @precondition(lambda self: any(self.log.values()))
    @rule(data=st.data(), p=st.sampled_from(PARTITIONS))
    def resend_copy(self, data: st.DataObject, p: int) -> None:
        """A client resends an earlier message's exact bytes, maybe to another partition."""
        msgs = [m for log in self.log.values() for m in log]
        self._append(p, data.draw(st.sampled_from(msgs)).value or b"")
        self._poll(p)

    @rule(p=st.sampled_from(PARTITIONS))
    def redeliver(self, p: int) -> None:
        """Kafka hands the partition out again from its committed offset."""
        self.position[p] = min(self.position[p], self.kafka_committed[p])
        self._poll(p)

    @rule(p=st.sampled_from(PARTITIONS))
    def poll(self, p: int) -> None:
        self._poll(p)

    @rule(key=st.sampled_from(KEYS))
    def transient_failure(self, key: str) -> None:
        self.flaky.add(key)

    @rule(
        p=st.sampled_from(PARTITIONS),
        key=st.sampled_from(KEYS),
        amount=st.sampled_from(AMOUNTS),
        point=st.sampled_from(["mid_handler", "before_commit"]),
        dies=st.booleans(),
    )
    def crash_before_commit(self, p: int, key: str, amount: int, point: str, dies: bool) -> None:
        """A message arrives and its transaction never commits: an error (leases released)
        or the process dying (leases left behind)."""
        self.delivered.add(key)
        self._append(p, msgpack.packb({"id": key, "amount": amount}))
        self.armed = (point, Crash() if dies else ConnectionResetError("injected"))
        self._poll(p)
        self.armed = None

    @rule(p=st.sampled_from(PARTITIONS), key=st.sampled_from(KEYS), amount=st.sampled_from(AMOUNTS))
    def crash_after_commit(self, p: int, key: str, amount: int) -> None:
        """A message arrives; the process dies after the commit: no done markers, leases
        left behind, no Kafka commit (the restart replays from the older position)."""
        self.delivered.add(key)
        self._append(p, msgpack.packb({"id": key, "amount": amount}))
        self.armed = ("after_commit", Crash())
        self._poll(p)
        self.armed = None

    @rule()
    def restart(self) -> None:
        self._restart()

    @rule()
    def leases_expire(self) -> None:
        self.run(self._delete_redis_keys("lease"))

    @rule()
    def redis_loses_everything(self) -> None:
        self.run(self._delete_redis_keys("lease"))
        self.run(self._delete_redis_keys("done"))

    # ------------------------------------------------------------ invariants

    def _effects(self) -> list[tuple[str, str]]:
        rows = self.run(self.conn.fetch(f"SELECT k, h FROM {self.table} WHERE ns = $1", self.ns))
        return [(r["k"], r["h"]) for r in rows]

    def _inbox(self) -> dict[str, tuple[str, str]]:
        rows = self.run(
            self.conn.fetch(
                "SELECT key, status, payload_hash FROM dedup.inbox WHERE namespace = $1", self.ns
            )
        )
        return {r["key"]: (r["status"], r["payload_hash"]) for r in rows}

    @invariant()
    def stores_agree(self) -> None:
        effects = self._effects()
        inbox = self._inbox()
        keys = [k for k, _ in effects]
        assert len(keys) == len(set(keys)), f"a key took effect twice: {sorted(effects)}"
        done = {(k, h) for k, (status, h) in inbox.items() if status == "done"}
        assert set(effects) == done, (effects, inbox)
        assert all(status in ("done", "rejected") for status, _ in inbox.values()), inbox
        for key, h in self.conflicts:
            assert (key, h) not in effects, f"conflicting payload of {key} applied"
            assert inbox[key][1] != h
        never_finished = set(inbox) - self.finished
        assert not never_finished, f"recorded without a finished run: {never_finished}"

    @invariant()
    def positions_only_move_forward(self) -> None:
        rows = self.run(
            self.conn.fetch(
                "SELECT partition, next_offset FROM dedup.offsets WHERE group_id = $1", self.group
            )
        )
        for r in rows:
            assert r["next_offset"] >= self.max_stored[r["partition"]]
            self.max_stored[r["partition"]] = r["next_offset"]

    def teardown(self) -> None:
        try:
            # Liveness: with the dead workers' leases gone and no more faults, every delivered
            # key gets decided (done or rejected) and every partition is consumed to its end.
            self.run(self._delete_redis_keys("lease"))
            self.flaky.clear()
            self._restart()
            for _ in range(3):
                for p in PARTITIONS:
                    self._poll(p)
            assert set(self._inbox()) == self.delivered
            for p in PARTITIONS:
                assert self.position[p] == len(self.log[p])
            self.stores_agree()
        finally:
            self.run(self._delete_redis_keys("lease"))
            self.run(self._delete_redis_keys("done"))
            self.run(self.conn.execute("DELETE FROM dedup.inbox WHERE namespace = $1", self.ns))
            self.run(
                self.conn.execute("DELETE FROM dedup.outbox WHERE topic LIKE $1", self.topic + "%")
            )
            self.run(self.conn.execute("DELETE FROM dedup.offsets WHERE group_id = $1", self.group))
            self.run(self.leases.close())
            self.run(self.conn.close())
            self.loop.close()


# About 15 s when it passes; shrinking a failure to its smallest form can take minutes.
@pytest.mark.timeout(600)
def test_protocol_state_machine(base_settings: Settings, pg_sync_table: str) -> None:
    StoreMachine.base_settings = base_settings
    StoreMachine.table = pg_sync_table
    StoreMachine.tally = Counter()
    run_state_machine_as_test(
        StoreMachine,
        settings=hypothesis_settings(
            max_examples=MAX_EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    tally = StoreMachine.tally
    for what in ("applied", "duplicate", "conflict", "rejected", "skipped", "crash", "retry"):
        assert tally[what] > 0, f"no run exercised {what}: {dict(tally)}"


@pytest.fixture
def base_settings(settings: Settings) -> Settings:
    return app_settings(settings, relay_enabled=False)


@pytest.fixture
def pg_sync_table(settings: Settings, unique: str) -> Any:
    name = f"eff_st_{unique}"

    async def ddl(sql: str) -> None:
        conn = await asyncpg.connect(settings.postgres_dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(ddl(f"CREATE TABLE {name} (ns text, k text, h text)"))
    try:
        yield name
    finally:
        asyncio.run(ddl(f"DROP TABLE IF EXISTS {name}"))
