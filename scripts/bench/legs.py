"""Running one leg: start its worker processes, line them up, time them, check their effects.

A leg is one way of consuming the same topic from its start in a consumer group of its own.
Its workers run as separate processes (harness.py protocol). They all join the group first;
``go`` is sent once the group's partitions are spread over all of them, so the time measured
is consuming, not starting Python or joining. A leg's time runs from the first batch any of
its workers began to the last batch any of them finished; the records it consumed divided by
that time is its rate. Every leg is checked for exactly-once before its figures count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncpg
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

from scripts.bench import handwritten, store, sysstat
from scripts.bench.dataset import Dataset
from scripts.toolkit.processes import ROOT as ROOT  # re-exported: runner, __main__
from scripts.toolkit.topics import create_topics

SETTLED_SUFFIX = ".settled"
# Modes whose positions live in the framework's dedup.offsets. A mode in PENDING_MODES (not
# built yet) is planned out by runner.plan; none is now.
FRAMEWORK_MODES = ("framework", "framework_batch")
PENDING_MODES: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Leg:
    key: str  # short name, used in group names and in the JSON summary
    label: str  # what the table shows
    mode: str  # "raw" | "naive" | "framework" | "framework_batch" | "competent" | "limit"
    workers: int = 1
    redis: bool = True
    optimistic: bool = False  # CONSUMER_OPTIMISTIC (docs/handlers.md): a framework leg's mode
    limit: int | None = None  # consume only this many records (the naive leg is slow)
    batch: int | None = None  # a latency leg's batch size


@dataclass
class Env:
    """What every leg of one run shares."""

    run_id: str
    bootstrap: str
    redis_url: str
    dsn: str  # the benchmark database
    batch: int
    log_dir: Path
    services: dict[str, int]
    say: Callable[[str], None]
    experiment: str = ""


@dataclass
class LegRun:
    leg: str
    repeat: int
    records: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    services_cpu_s: dict[str, float] = field(default_factory=dict)
    load: float = 0.0
    check: str = ""
    ok: bool = False
    error: str = ""
    latency: dict[str, Any] = field(default_factory=dict)
    offered_msgs_s: float = 0.0  # a latency leg's paced rate

    @property
    def msgs_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_msg(self) -> float:
        return 1e6 * self.cpu_s / self.records if self.records else 0.0

    @property
    def services_us_per_msg(self) -> float:
        return 1e6 * sum(self.services_cpu_s.values()) / self.records if self.records else 0.0


def _open_log(path: Path) -> IO[bytes]:
    return path.open("wb")


class Proc:
    """One worker process and what it has said so far."""

    def __init__(self, proc: asyncio.subprocess.Process, log: IO[bytes]) -> None:
        self.proc = proc
        self.log = log
        self.assigned: list[int] = []
        self.consumed = 0
        self.report: dict[str, Any] | None = None
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, spec: dict[str, Any], log_path: Path) -> Proc:
        log = _open_log(log_path)
        # The hand-written peers have a process of their own (handwritten.py).
        module = "scripts.bench." + (
            "handwritten" if spec["mode"] in handwritten.MODES else "worker"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            json.dumps(spec),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        return cls(proc, log)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("event")
            if kind == "assigned":
                self.assigned = event["partitions"]
            elif kind == "progress":
                self.consumed = event["consumed"]
            elif kind == "report":
                self.report = event

    def send(self, word: str) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            with contextlib.suppress(Exception):
                self.proc.stdin.write(f"{word}\n".encode())

    async def finish(self, timeout_s: float) -> dict[str, Any]:
        """Ask it to stop, wait for its report; kill it (this pid only) if it hangs."""
        self.send("stop")
        try:
            await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.reader, 5)
        self.log.close()
        return self.report or {"error": f"worker exited {self.proc.returncode} without a report"}


async def _lined_up(procs: list[Proc], partitions: int, timeout_s: float) -> None:
    """Wait until the group's partitions are spread over all workers (one generation)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = [p.assigned for p in procs]
        spread = sorted(x for a in got for x in a)
        if all(got) and spread == list(range(partitions)):
            return
        if any(p.proc.returncode is not None for p in procs):
            raise RuntimeError("a worker exited before joining the group")
        await asyncio.sleep(0.05)
    raise TimeoutError(f"workers did not join the group within {timeout_s:.0f}s")


async def positions_of(conn: asyncpg.Connection, mode: str, group: str) -> dict[int, int]:
    """A leg's stored positions: dedup.offsets for the framework, its own table for a peer."""
    if mode in handwritten.MODES:
        return await handwritten.stored_positions(conn, group)
    return await store.stored_positions(conn, group)


async def _caught_up(
    env: Env, mode: str, group: str, ends: dict[int, int], procs: list[Proc], deadline: float
) -> None:
    """Poll the leg's stored positions until they reach the ends of the topic."""
    conn = await asyncpg.connect(env.dsn)
    next_say = time.monotonic() + 10
    total = sum(ends.values())
    try:
        while True:
            pos = await positions_of(conn, mode, group)
            if all(pos.get(p, 0) >= end for p, end in ends.items()):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not caught up: {sum(pos.values())}/{total} stored")
            if any(p.proc.returncode is not None for p in procs):
                raise RuntimeError("a worker exited before the end of the topic")
            if time.monotonic() >= next_say:
                next_say = time.monotonic() + 10
                env.say(f"    … {group}: {sum(pos.values()):,}/{total:,} stored")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def committed_offsets(bootstrap: str, group: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


async def forget_redis_keys(url: str, run_id: str) -> int:
    """Delete this run's Redis keys (leases, done markers, naive markers); nothing else."""
    r = aioredis.Redis.from_url(url)
    n = 0
    try:
        batch: list[bytes] = []
        async for key in r.scan_iter(match=f"*{{{run_id}-*", count=5_000):
            batch.append(key)
            if len(batch) >= 2_000:
                n += await r.unlink(*batch)
                batch = []
        if batch:
            n += await r.unlink(*batch)
    finally:
        await r.aclose()
    return n


def worker_spec(env: Env, leg: Leg, group: str, topic: str, data: Dataset | None) -> dict[str, Any]:
    limit = leg.limit if leg.limit is not None else (data.total if data else 0)
    return {
        "mode": leg.mode,
        "group": group,
        "topic": topic,
        "out_topic": topic + SETTLED_SUFFIX,
        "batch": env.batch,
        "limit": limit,
        "bootstrap": env.bootstrap,
        "redis_url": env.redis_url,
        "dsn": env.dsn,
        "experiment": env.experiment,
        "settings": {
            "kafka_bootstrap": env.bootstrap,
            "redis_url": env.redis_url,
            "postgres_dsn": env.dsn,
            "batch_max_records": env.batch,
            "redis_mode": "on" if leg.redis else "off",
            "optimistic": leg.optimistic,
            # The relay would publish the outbox rows to Kafka while the leg runs, on the same
            # two cores: off, so the rate is the consuming side's. See docs/benchmarks.md.
            "relay_enabled": False,
            "status_interval_s": 3600.0,
            "done_cache_s": 3600,
        },
    }


async def run_leg(
    env: Env,
    leg: Leg,
    repeat: int,
    data: Dataset,
    *,
    offer: Callable[[], Any] | None = None,
    latency: bool = False,
    extra: dict[str, Any] | None = None,
) -> LegRun:
    """Run one repeat of ``leg`` over ``data`` (or over what ``offer()`` produces, while it runs).

    ``offer`` is the latency leg's paced producer: it is started after ``go`` and returns the
    Dataset it produced; the leg then runs until that has been consumed.
    """
    group = f"{env.run_id}-{leg.key}-{repeat}"
    out = LegRun(leg.key, repeat)
    await store.reset(env.dsn)
    if leg.mode in handwritten.MODES:
        await handwritten.reset(env.dsn)
    spec = worker_spec(env, leg, group, data.topic, data)
    spec.update(latency=latency, **(extra or {}))
    procs: list[Proc] = []
    try:
        for i in range(leg.workers):
            procs.append(
                await Proc.start({**spec, "worker_id": i}, env.log_dir / f"{group}-{i}.log")
            )
        await _lined_up(procs, data.partitions, 90)
        svc0 = sysstat.cpu_seconds(env.services)
        for p in procs:
            p.send("go")
        if offer is not None:
            data = await offer()
        expected_records = leg.limit or data.total
        deadline = time.monotonic() + 60 + expected_records / 150
        if leg.mode in FRAMEWORK_MODES or leg.mode in handwritten.MODES:
            await _caught_up(env, leg.mode, group, data.ends, procs, deadline)
        else:
            await asyncio.wait_for(
                asyncio.gather(*(p.proc.wait() for p in procs)), deadline - time.monotonic()
            )
        svc1 = sysstat.cpu_seconds(env.services)
        out.services_cpu_s = {k: svc1[k] - svc0.get(k, 0.0) for k in svc1}
        out.load = sysstat.load()
    except Exception as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    reports = [await p.finish(60) for p in procs]
    errors = [r["error"] for r in reports if r.get("error")]
    if errors and not out.error:
        out.error = "; ".join(errors)
    if out.error:
        return out
    firsts = [r["first_ts"] for r in reports if r.get("first_ts")]
    lasts = [r["last_ts"] for r in reports if r.get("last_ts")]
    out.seconds = max(lasts) - min(firsts) if firsts and lasts else 0.0
    out.records = sum(r["consumed"] for r in reports)
    out.cpu_s = sum(r["cpu_s"] for r in reports)
    if latency:
        out.latency = reports[0]["latency"]
    await _verify(env, leg, group, data, reports, out)
    return out


async def _verify(
    env: Env, leg: Leg, group: str, data: Dataset, reports: list[dict[str, Any]], out: LegRun
) -> None:
    """Exactly once, or the leg fails: each consumed key applied once, every offset accounted."""
    if leg.mode == "raw":
        committed = await committed_offsets(env.bootstrap, group)
        gaps = sum(r.get("gaps", 0) for r in reports)
        out.ok = committed == data.ends and gaps == 0 and out.records == data.total
        out.check = (
            f"every offset once: consumed {out.records}/{data.total}, gaps={gaps}, "
            f"committed={'= ends' if committed == data.ends else committed}"
        )
        return
    if leg.mode == "naive":
        positions = await committed_offsets(env.bootstrap, group)
        if positions != {int(k): v for k, v in reports[0].get("positions", {}).items()}:
            out.check = f"Kafka committed offsets {positions} differ from the worker's report"
            return
        if sum(positions.values()) != out.records:
            out.check = f"committed {sum(positions.values())} records, consumed {out.records}"
            return
    else:
        conn = await asyncpg.connect(env.dsn)
        try:
            positions = await positions_of(conn, leg.mode, group)
        finally:
            await conn.close()
        if positions != data.ends:
            out.check = f"stored positions {positions} are not the topic's ends {data.ends}"
            return
    result = await store.check(env.dsn, group, data.expected(positions))
    out.ok, out.check = result.ok, result.describe()


async def make_topics(env: Env, base: str, partitions: int) -> None:
    await create_topics(env.bootstrap, dict.fromkeys([base, base + SETTLED_SUFFIX], partitions))
