"""The fault schedule and the injector: what breaks, when, and whether it took.

Scheduled faults happen on real processes and services at seeded times while the workload is
being produced; each is recorded with whether it actually took effect (a deterministic fault
point that was never reached does not count). On top of them, every process runs with
``DEDUP_TEST_FAULTS`` (random crashes at the named points); those are counted afterwards from
the ``consumer fault point`` lines in the logs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from scripts.chaos import kafka_faults, pg_faults, topic_recreate
from scripts.chaos.fleet import Fleet, Proc
from scripts.chaos.pg_failover import Failovers
from scripts.chaos.producer import Producer
from scripts.chaos.services import Instance
from scripts.chaos.topic_recreate import Retired
from scripts.chaos.workload import Extra, Record
from scripts.toolkit.processes import ROOT

log = logging.getLogger("chaos.faults")

# The default run's 20, in an order that spreads the heavy ones (broker, database) apart.
# The database faults that replace the database (restore, failovers) come after the plain
# restart: after a failover the services' own PostgreSQL is gone.
DEFAULT_ORDER = (
    "worker_kill",
    "broker_restart",
    "aborted_transactions",
    "point_after_commit",
    "redis_restart",
    "rebalance_add",
    "worker_pause",
    "postgres_restart",
    "unparseable_record",
    "point_before_commit",
    "relay_kill_after_ack",
    "topic_recreate",
    "redis_flushall",
    "postgres_restore",
    "rebalance_remove",
    "point_mid_handler",
    "postgres_failover_sync",
    "downstream_kill",
    "worker_kill",
    "postgres_failover_async",
)
KINDS = tuple(dict.fromkeys(DEFAULT_ORDER))
# Replace the services' database: after the first failover, restarts and restores are moot.
PG_REPLACING = ("postgres_restore", "postgres_failover_sync", "postgres_failover_async")
# Names of the processes started to crash at a fault point (their crashes are scheduled ones).
ONE_OFF = ("crash-", "relay-crash")


def schedule(n: int, rng: random.Random) -> list[str]:
    """``n`` fault kinds: every kind once before any repeats (the default order for 20)."""
    if n == len(DEFAULT_ORDER):
        return list(DEFAULT_ORDER)
    kinds = list(KINDS)
    rng.shuffle(kinds)
    out = kinds[:n]
    while len(out) < n:
        again = [k for k in KINDS if not k.startswith("rebalance") and k not in PG_REPLACING]
        out.append(rng.choice(again))
    # An added worker must exist before one is removed.
    if "rebalance_remove" in out and "rebalance_add" in out:
        a, r = out.index("rebalance_add"), out.index("rebalance_remove")
        if r < a:
            out[a], out[r] = out[r], out[a]
    # Plain PostgreSQL restarts before anything replaces the database, failovers last.
    plain = [k for k in out if k not in PG_REPLACING]
    return plain + [k for k in PG_REPLACING if k in out]


@dataclass
class Event:
    t_s: float
    kind: str
    detail: str
    took: bool


@dataclass
class Injector:
    fleet: Fleet
    instance: Instance
    app_spec: str
    pause_s: float
    rng: random.Random
    topic: str = ""  # the input topic, for the faults that produce records themselves
    partitions: int = 6
    extra: Extra = field(default_factory=Extra)  # their ground truth
    producer: Producer | None = None  # paused by topic_recreate
    group: str = ""
    originals: dict[str, Record] = field(default_factory=dict)  # chaos-id -> what was sent
    retired: list[Retired] = field(default_factory=list)  # deleted incarnations of the topic
    failovers: Failovers | None = None  # set when a failover is scheduled (the DSN is a proxy)
    dsn: str = ""  # the DSN of the run (the proxy's, with a failover scheduled)
    t0: float = field(default_factory=time.monotonic)
    events: list[Event] = field(default_factory=list)
    _extra: list[str] = field(default_factory=list)
    _n: int = 0

    # ---------------------------------------------------------------- running

    async def run(self, kinds: list[str], duration_s: float) -> None:
        """Inject ``kinds`` one after another at seeded times spread over ``duration_s``."""
        n = len(kinds)
        for i, kind in enumerate(kinds):
            due = self.t0 + duration_s * (0.05 + 0.85 * (i + self.rng.uniform(0.2, 0.8)) / n)
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await self.inject(kind)

    async def inject(self, kind: str) -> None:
        t = time.monotonic() - self.t0
        action: Callable[[], Awaitable[tuple[str, bool]]] = getattr(self, f"_{kind}")
        try:
            detail, took = await action()
        except Exception as exc:
            detail, took = f"injection failed: {type(exc).__name__}: {exc}", False
        log.info("fault %-20s at %6.1fs: %s%s", kind, t, detail, "" if took else " (no effect)")
        self.events.append(Event(round(t, 1), kind, detail, took))

    def counts(self, random_points: Counter[str]) -> Counter[str]:
        c: Counter[str] = Counter(e.kind for e in self.events if e.took)
        for point, n in random_points.items():
            c[f"random_{point}"] += n
        return c

    # ---------------------------------------------------------------- helpers

    def _workers(self, group: str = "payments") -> list[int]:
        pids: list[int] = []
        sup = self.fleet.procs.get(group)
        if sup is not None:
            pids += sup.children()
        if group == "payments":
            pids += [p.pid for n in self._extra if (p := self.fleet.procs[n]).alive() and p.pid]
        return pids

    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-{self._n}"

    async def _one_off(self, name: str, args: list[str], spec: str) -> tuple[str, bool]:
        """A process that must crash at a fault point by itself (probability 1)."""
        proc: Proc = self.fleet.start(name, args, DEDUP_TEST_FAULTS=spec)
        code = await self.fleet.wait_exit(proc, 45)
        if code is None:
            await self.fleet.stop(name, 20)
            return f"{name}: {spec} never reached in 45s; stopped", False
        took = code == 137 and bool(proc.fault_lines())
        return f"{name}: exited {code} at {spec.split('=')[0]}", took

    # ---------------------------------------------------------------- the faults

    async def _worker_kill(self) -> tuple[str, bool]:
        pids = self._workers()
        if not pids:
            return "no worker running", False
        pid = self.rng.choice(pids)
        return f"SIGKILL worker pid {pid}", self.fleet.signal_pid(pid, signal.SIGKILL)

    async def _downstream_kill(self) -> tuple[str, bool]:
        pids = self._workers("downstream")
        if not pids:
            return "no downstream worker running", False
        pid = self.rng.choice(pids)
        return f"SIGKILL downstream pid {pid}", self.fleet.signal_pid(pid, signal.SIGKILL)

    async def _worker_pause(self) -> tuple[str, bool]:
        pids = self._workers()
        if not pids:
            return "no worker running", False
        pid = self.rng.choice(pids)
        if not self.fleet.signal_pid(pid, signal.SIGSTOP):
            return f"pid {pid} gone", False
        await asyncio.sleep(self.pause_s)
        self.fleet.signal_pid(pid, signal.SIGCONT)
        return f"SIGSTOP pid {pid} for {self.pause_s:.0f}s (past lease and session), SIGCONT", True

    async def _redis_restart(self) -> tuple[str, bool]:
        s = await self.instance.script("restart-redis")
        return f"Redis SIGKILLed and restarted empty in {s:.1f}s", True

    async def _redis_flushall(self) -> tuple[str, bool]:
        await self.instance.flushall()
        return "FLUSHALL", True

    async def _postgres_restart(self) -> tuple[str, bool]:
        if why := self._after_failover():
            return why, False
        s = await self.instance.script("restart-pg-immediate")
        return f"PostgreSQL restarted in immediate mode in {s:.1f}s", True

    async def _broker_restart(self) -> tuple[str, bool]:
        await self.instance.script("kill-kafka")
        await asyncio.sleep(2.0)
        s = await self.instance.script("start-kafka")
        return f"broker SIGKILLed, down 2s, back in {s:.1f}s", True

    async def _rebalance_add(self) -> tuple[str, bool]:
        name = self._name("extra")
        self._extra.append(name)
        self.fleet.start(name, ["worker", self.app_spec, "--id", str(100 + self._n)])
        return f"worker {name} added", True

    async def _rebalance_remove(self) -> tuple[str, bool]:
        alive = [n for n in self._extra if self.fleet.procs[n].alive()]
        if not alive:  # nothing added yet: add one first (its own event), let it join
            await self.inject("rebalance_add")
            await asyncio.sleep(8)
            alive = self._extra[-1:]
        name = alive[-1]
        code = await self.fleet.stop(name, 30)
        return f"worker {name} stopped (SIGTERM, drained, exit {code})", True

    async def _point_after_commit(self) -> tuple[str, bool]:
        args = ["worker", self.app_spec, "--id", str(200 + self._n)]
        return await self._one_off(self._name("crash-after-commit"), args, "after_commit=1")

    async def _point_before_commit(self) -> tuple[str, bool]:
        args = ["worker", self.app_spec, "--id", str(200 + self._n)]
        return await self._one_off(self._name("crash-before-commit"), args, "before_commit=1")

    async def _point_mid_handler(self) -> tuple[str, bool]:
        args = ["worker", self.app_spec, "--id", str(200 + self._n)]
        return await self._one_off(self._name("crash-mid-handler"), args, "mid_handler=1")

    async def _relay_kill_after_ack(self) -> tuple[str, bool]:
        name = self._name("relay-crash")
        return await self._one_off(name, ["relay", self.app_spec], "relay_after_ack=1")

    async def _aborted_transactions(self) -> tuple[str, bool]:
        tag = self._name("txn")
        bootstrap = self.instance.bootstrap
        detail = await kafka_faults.aborted_transactions(
            bootstrap, self.topic, self.extra, tag, self.partitions
        )
        return detail, True

    async def _unparseable_record(self) -> tuple[str, bool]:
        tag = self._name("raw")
        bootstrap = self.instance.bootstrap
        detail = await kafka_faults.unparseable_record(
            bootstrap, self.topic, self.extra, tag, self.partitions
        )
        return detail, True

    async def _topic_recreate(self) -> tuple[str, bool]:
        assert self.producer is not None
        originals = {**self.originals, **self.extra.resendable}
        retired, detail, took = await topic_recreate.recreate(
            bootstrap=self.instance.bootstrap,
            dsn=self.dsn or self.instance.dsn,
            topic=self.topic,
            partitions=self.partitions,
            group=self.group,
            producer=self.producer,
            originals=originals,
            unparseable={(p, o): h for (t, p, o), h in self.extra.unparseable.items()},
            logs=[p.log for p in self.fleet.procs.values()],
            app_spec=self.app_spec,
            env=self.fleet.env,
            cwd=ROOT,
        )
        self.retired.append(retired)
        # The retired generation's unparseable records are evidence of that generation only.
        self.extra.unparseable = {}
        return detail, took

    def _after_failover(self) -> str | None:
        if self.failovers is not None and self.failovers.started:
            return "after a failover the services' PostgreSQL is gone: not injected"
        return None

    async def _postgres_restore(self) -> tuple[str, bool]:
        if why := self._after_failover():
            return why, False
        return await pg_faults.restore(self.instance), True

    async def _postgres_failover_sync(self) -> tuple[str, bool]:
        if self.failovers is None:
            return "no proxy in front of PostgreSQL", False
        return await self.failovers.failover(synchronous=True), True

    async def _postgres_failover_async(self) -> tuple[str, bool]:
        if self.failovers is None:
            return "no proxy in front of PostgreSQL", False
        return await self.failovers.failover(synchronous=False), True


def describe(events: list[Event]) -> list[dict[str, Any]]:
    return [e.__dict__ for e in events]
