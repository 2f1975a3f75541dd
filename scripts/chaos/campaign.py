"""One chaos run: a fresh instance, the fleet, the workload under faults, drain, evidence.

Order: wipe and start the campaign's own services; create the topics; apply migrations;
write the ground truth; start the payments supervisor, the downstream supervisor and a
stand-alone relay; produce the workload in bursts while the injector breaks things; wait
until everything produced has been consumed, relayed and consumed downstream; stop the
processes (drained); read the evidence and check it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg

from scripts.chaos import checker, collect, workload
from scripts.chaos.faults import ONE_OFF, Injector, describe, schedule
from scripts.chaos.fleet import Fleet, reap_leftovers
from scripts.chaos.pg_failover import Cluster, Failovers
from scripts.chaos.pg_proxy import PgProxy
from scripts.chaos.producer import Producer
from scripts.chaos.services import Instance
from scripts.toolkit.processes import ROOT
from scripts.toolkit.topics import create_topics

log = logging.getLogger("chaos.campaign")

PAYMENTS_APP = "handlers.app:app"
DOWNSTREAM_APP = "scripts.chaos.downstream:app"
PARTITIONS = 6
SETTLED_PARTITIONS = 3
TRUTH_FILE = "truth.jsonl"  # the ground truth, scripts/toolkit/truth.py format

# Short timeouts so that a paused worker outlives its leases and its group session within
# seconds, and restarts are quick. The pause fault waits past both.
TUNING = {
    "CONSUMER_LEASE_MS": "3000",
    "CONSUMER_LEASE_WAIT_MS": "2000",
    "CONSUMER_SESSION_TIMEOUT_MS": "6000",
    "CONSUMER_HEARTBEAT_INTERVAL_MS": "1500",
    "CONSUMER_REDIS_RETRY_S": "2",
    "CONSUMER_RELAY_POLL_MS": "200",
    "CONSUMER_RELAY_PUBLISH_TIMEOUT_MS": "10000",
    "CONSUMER_STATUS_INTERVAL_S": "30",
    "CONSUMER_BATCH_MAX_RECORDS": "200",
    "CONSUMER_RESTART_BACKOFF_S": "0.2",
    "CONSUMER_RESTART_BACKOFF_MAX_S": "2",
    "CONSUMER_SHUTDOWN_GRACE_S": "20",
}


@dataclass
class RunConfig:
    name: str
    records: int
    faults: int
    seed: int
    workers: int
    duration_s: float
    out: Path
    random_faults: str = ""  # DEDUP_TEST_FAULTS of every process of the fleet
    broken: str = ""  # DEDUP_TEST_BROKEN: the deliberately broken build
    drain_timeout_s: float = 240.0
    kinds: list[str] | None = None  # the scheduled faults; default: ``faults`` seeded kinds


@dataclass
class RunResult:
    cfg: RunConfig
    workload: dict[str, int]
    check: checker.Result
    faults: Counter[str]
    events: list[dict[str, Any]]
    seconds: float
    drained: bool
    producer: dict[str, int] = field(default_factory=dict)
    exits: dict[str, list[int]] = field(default_factory=dict)


def _names() -> checker.Names:
    from handlers.app import REQUESTED, SETTLED
    from handlers.app import app as payments
    from scripts.chaos.downstream import app as downstream

    return checker.Names(
        REQUESTED, SETTLED, payments.group, downstream.group, payments.handlers[0].name
    )


def _migrate(env: dict[str, str], app_spec: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "consumer", "migrate", app_spec],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )


async def _drained(inst: Instance, dsn: str, names: checker.Names) -> bool:
    """Everything produced is consumed, relayed, and consumed downstream."""
    topics = {names.requested: PARTITIONS, names.settled: SETTLED_PARTITIONS}
    ends = await collect.end_offsets(inst.bootstrap, topics)
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        stored = await collect.stored_offsets(conn)
        pending = await collect.outbox_pending(conn)
    finally:
        await conn.close()
    if pending:
        return False
    for (topic, part), end in ends.items():
        group = names.group if topic == names.requested else names.downstream_group
        # Beyond the end is not drained either: a position a deleted incarnation of the topic
        # reached, that nothing has consumed the re-created topic up to (topic_recreate).
        if stored.get((group, topic, part), 0) != end:
            return False
    return True


async def _wait_drained(inst: Instance, dsn: str, names: checker.Names, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    streak = 0
    while time.monotonic() < deadline:
        try:
            streak = streak + 1 if await _drained(inst, dsn, names) else 0
        except Exception as exc:  # a service still coming back after the last fault
            log.info("drain check: %s: %s", type(exc).__name__, exc)
            streak = 0
        if streak >= 3:  # stable: nothing left in flight, the relay had its chance
            return True
        await asyncio.sleep(1.0)
    return False


def process_env(inst: Instance, cfg: RunConfig) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUMER_")}
    env.update(inst.consumer_env())
    env.update(TUNING)
    env["DEDUP_TEST_FAULTS"] = cfg.random_faults
    env["DEDUP_TEST_BROKEN"] = cfg.broken
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def run(inst: Instance, cfg: RunConfig) -> RunResult:
    t0 = time.monotonic()
    rng = random.Random(cfg.seed)
    names = _names()
    # Logs are appended to across restarts within a run, so an earlier run's must go: the
    # random fault points are counted from them.
    shutil.rmtree(cfg.out / "logs", ignore_errors=True)
    cfg.out.mkdir(parents=True, exist_ok=True)
    pidfile = inst.dir / "fleet.pids"
    if leftovers := reap_leftovers(pidfile, inst.bootstrap):
        log.warning("killed %d process(es) left over by an earlier run", len(leftovers))
    log.info("[%s] fresh services instance %r", cfg.name, inst.name)
    await inst.fresh()
    topics = {names.requested: PARTITIONS, names.settled: SETTLED_PARTITIONS}
    for base in list(topics):
        topics[base + ".dlq"] = topics[base + ".conflicts"] = 3
    await create_topics(inst.bootstrap, topics, exist_ok=True)
    env = process_env(inst, cfg)
    kinds = cfg.kinds or schedule(cfg.faults, rng)
    # With a failover scheduled, every DSN of the run names the campaign's proxy, which the
    # failover switches to the promoted standby.
    dsn, failovers = inst.dsn, None
    if any(k.startswith("postgres_failover") for k in kinds):
        proxy = PgProxy(inst.port_base + 5431, inst.ports["pg"])
        await proxy.start()
        dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/consumer"
        env["CONSUMER_POSTGRES_DSN"] = dsn
        failovers = Failovers(inst, proxy, Cluster(inst.ports["pg"], _pg_data(inst)))
    await asyncio.to_thread(_migrate, env, PAYMENTS_APP)
    await asyncio.to_thread(_migrate, env, DOWNSTREAM_APP)

    wl = workload.build(cfg.seed, cfg.records, PARTITIONS)
    wl.save(cfg.out / TRUTH_FILE)
    log.info("[%s] workload: %s", cfg.name, wl.counts())

    fleet = Fleet(cfg.out / "logs", env, pidfile)
    producer = Producer(inst.bootstrap, {"requested": names.requested, "settled": names.settled})
    injector = Injector(
        fleet,
        inst,
        PAYMENTS_APP,
        pause_s=_pause_s(),
        rng=random.Random(cfg.seed + 1),
        topic=names.requested,
        partitions=PARTITIONS,
        producer=producer,
        group=names.group,
        originals={str(r.id): r for r in wl.records if r.target == "requested"},
        failovers=failovers,
        dsn=dsn,
    )
    drained = False
    try:
        fleet.start("payments", ["run", PAYMENTS_APP, "--workers", str(cfg.workers)])
        fleet.start("downstream", ["run", DOWNSTREAM_APP, "--workers", "1"])
        fleet.start("relay", ["relay", PAYMENTS_APP], restart=True)
        injector.t0 = time.monotonic()
        chunk = workload.chunk_size(cfg.records)
        await asyncio.gather(
            producer.run(wl, chunk, cfg.duration_s),
            injector.run(kinds, cfg.duration_s),
        )
        log.info("[%s] produced %d records; draining", cfg.name, producer.sent)
        drained = await _wait_drained(inst, dsn, names, cfg.drain_timeout_s)
        if not drained:
            log.warning("[%s] not drained after %.0fs", cfg.name, cfg.drain_timeout_s)
        await fleet.stop_all()
    finally:
        fleet.kill_everything()
        await producer.close()

    random_points: Counter[str] = Counter()
    for proc in fleet.procs.values():
        if not proc.name.startswith(ONE_OFF):  # those crash on purpose, counted as scheduled
            random_points.update(proc.fault_lines())
    try:
        evidence = await collect.collect(inst.bootstrap, dsn, topics, injector.extra.unparseable)
        evidence.db_rewound = any(
            e.took and e.kind in ("postgres_restore", "postgres_failover_async")
            for e in injector.events
        )
    finally:
        if failovers is not None:
            await failovers.proxy.close()
            await failovers.stop()
    for gen, retired in enumerate(injector.retired, start=1):
        evidence.topics[names.requested] += [replace(r, generation=gen) for r in retired.records]
        evidence.retired_consumed[gen] = retired.consumed
    truth = workload.load_truth(cfg.out / TRUTH_FILE)
    injector.extra.merge(truth)  # the records the faults produced themselves
    header = {k: v for k, v in truth.items() if k != "records"}
    workload.save_truth(cfg.out / TRUTH_FILE, header, truth["records"])
    result = checker.check(truth, evidence, names)
    if evidence.outbox_pending:
        result.counts["outbox_pending"] = evidence.outbox_pending
    counts = wl.counts()
    # The keys the faults produced (aborted_transactions, unparseable_record) take effect too;
    # the keys only ever sent in aborted transactions must not.
    counts["unique_keys"] = sum(1 for k in truth["keys"].values() if k["outcome"] != "never")
    return RunResult(
        cfg,
        counts,
        result,
        injector.counts(random_points),
        describe(injector.events),
        time.monotonic() - t0,
        drained,
        {"sent": producer.sent, "resent": producer.resent},
        {n: p.exits for n, p in fleet.procs.items()},
    )


def _pg_data(inst: Instance) -> Path:
    # services.sh may keep the cluster in /var/tmp behind a symlink (see pg_prepare_dir).
    return (inst.dir / "pg").resolve() / "data"


def _pause_s() -> float:
    lease_s = int(TUNING["CONSUMER_LEASE_MS"]) / 1000
    session_s = int(TUNING["CONSUMER_SESSION_TIMEOUT_MS"]) / 1000
    return max(lease_s, session_s) + 2.0


async def teardown(inst: Instance, keep: bool) -> None:
    if not keep:
        with contextlib.suppress(Exception):
            await inst.down()
