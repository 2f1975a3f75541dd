"""One benchmark run: produce the topic once, run every leg ``repeats`` times, then latency.

Legs are interleaved (raw, framework, ... then again) so that a noisy minute on a shared
machine spreads over all of them instead of sinking one. Between legs the benchmark database
is emptied and the run's Redis keys are deleted, so every leg starts from the same state.
Topics are deleted at the end unless ``keep_topics``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from consumer import load_settings
from scripts.bench import dataset, legs, peers, store, sysstat
from scripts.bench.dataset import Dataset, Payloads
from scripts.bench.legs import ROOT, Env, Leg, LegRun
from scripts.bench.peers import PATHS


@dataclass
class Config:
    records: int = 200_000
    repeats: int = 3
    batch: int = 500
    partitions: int = 6
    dup_ratio: float = 0.10
    naive_records: int = 20_000
    workers: tuple[int, ...] = (2, 4)
    latency_batches: tuple[int, ...] = (500, 100)
    latency_s: float = 15.0
    latency_rate: float | None = None
    only: tuple[str, ...] = ()  # leg keys to run; empty = all
    profile: str = ""  # a framework path to profile alone, or ""
    keep_topics: bool = False
    write_doc: bool = True
    experiment: str = ""  # see worker._experiment
    command: str = "make bench"


@dataclass
class Results:
    config: Config
    run_id: str
    started_at: datetime
    seconds: float = 0.0
    load_before: float = 0.0
    load_after: float = 0.0
    legs: list[Leg] = field(default_factory=list)
    runs: dict[str, list[LegRun]] = field(default_factory=dict)
    offered_msgs_s: float = 0.0
    pg: dict[str, str] = field(default_factory=dict)
    profile_path: Path | None = None


def plan(cfg: Config) -> list[Leg]:
    naive_limit = min(cfg.naive_records, cfg.records)

    def path(key: str, n: int) -> Leg:
        label = f"{PATHS[key]}, " + ("1 worker" if n == 1 else f"{n} workers")
        return Leg(peers.leg_key(key, n), label, key, workers=n)

    all_legs = [
        Leg("raw", "raw aiokafka (no decode)", "raw"),
        *(path(key, 1) for key in PATHS),
        Leg("pg_only", "framework, Redis off", "framework", redis=False),
        Leg("optimistic", "framework, optimistic, 1 worker", "framework", optimistic=True),
        Leg("naive", "naive per-message", "naive", limit=naive_limit),
        *(path(key, n) for n in cfg.workers for key in PATHS),
    ]
    all_legs = [leg for leg in all_legs if leg.mode not in legs.PENDING_MODES]
    if cfg.only:
        all_legs = [leg for leg in all_legs if leg.key in cfg.only]
    return all_legs


def _line(leg: Leg, run: LegRun) -> str:
    if run.error:
        return f"    {leg.label} #{run.repeat}: ERROR {run.error}"
    mark = "exactly once" if run.ok else f"CHECK FAILED: {run.check}"
    return (
        f"    {leg.label} #{run.repeat}: {run.records:,} msgs in {run.seconds:.1f}s = "
        f"{run.msgs_s:,.0f} msg/s, cpu {run.cpu_us_per_msg:.0f} µs/msg "
        f"(+ services {run.services_us_per_msg:.0f}), load {run.load:.1f}; {mark}"
    )


async def _pg_settings(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {k: await conn.fetchval(f"SHOW {k}") for k in ("fsync", "synchronous_commit")}
    finally:
        await conn.close()


async def run(cfg: Config, say: Any) -> Results:
    t0 = time.monotonic()
    settings = load_settings()
    run_id = f"bench-{uuid.uuid4().hex[:6]}"
    res = Results(cfg, run_id, datetime.now(UTC), load_before=sysstat.load())
    log_dir = ROOT / "out" / "bench" / run_id
    log_dir.mkdir(parents=True, exist_ok=True)
    dsn = await store.prepare(settings.postgres_dsn)
    res.pg = await _pg_settings(dsn)
    env = Env(
        run_id,
        settings.kafka_bootstrap,
        settings.redis_url,
        dsn,
        cfg.batch,
        log_dir,
        sysstat.service_pids(ROOT / ".services"),
        say,
        cfg.experiment,
    )
    topics: list[str] = []
    try:
        await legs.make_topics(env, run_id, cfg.partitions)
        topics += [run_id, run_id + legs.SETTLED_SUFFIX]
        say(f"run {run_id}: producing {cfg.records:,} records to {run_id} ({cfg.partitions} p.)")
        data = await dataset.produce(
            env.bootstrap,
            run_id,
            cfg.partitions,
            cfg.records,
            Payloads(run_id, cfg.dup_ratio),
            lambda n: say(f"    produced {n:,}") if n % 50_000 == 0 else None,
        )
        say(f"    {data.total:,} records, {len(data.expected()):,} distinct keys; logs {log_dir}")
        if cfg.profile:
            await _profile(env, data, res, cfg.profile)
            return res
        res.legs = plan(cfg)
        total = len(res.legs) * cfg.repeats
        n = 0
        for repeat in range(1, cfg.repeats + 1):
            for leg in res.legs:
                n += 1
                say(f"[{n}/{total}] {leg.label} #{repeat}")
                result = await legs.run_leg(env, leg, repeat, data)
                res.runs.setdefault(leg.key, []).append(result)
                say(_line(leg, result))
                await legs.forget_redis_keys(env.redis_url, run_id)
        if not cfg.only or "latency" in cfg.only:
            await _latency(env, cfg, res, topics)
    finally:
        with contextlib.suppress(Exception):
            await legs.forget_redis_keys(env.redis_url, run_id)
        with contextlib.suppress(Exception):
            await store.reset(dsn)
        if topics and not cfg.keep_topics:
            with contextlib.suppress(Exception):
                await dataset.delete_topics(env.bootstrap, topics)
        res.seconds = time.monotonic() - t0
        res.load_after = sysstat.load()
    return res


def median_rate(res: Results, key: str = "framework") -> float | None:
    ok = [r.msgs_s for r in res.runs.get(key, []) if r.ok]
    return statistics.median(ok) if ok else None


async def _latency(env: Env, cfg: Config, res: Results, topics: list[str]) -> None:
    """Each path's latency at half its own measured rate (or at ``--latency-rate``)."""
    measured = [key for key in PATHS if key in res.runs]
    for key in measured or ["framework"]:
        if key in legs.PENDING_MODES:
            continue
        rate = cfg.latency_rate or ((median_rate(res, key) or 0) / 2)
        if rate <= 0:
            env.say(f"latency: {key} skipped (no rate measured; pass --latency-rate)")
            continue
        if key == "framework":
            res.offered_msgs_s = rate
        await _latency_path(env, cfg, res, topics, key, rate)


async def _latency_path(
    env: Env, cfg: Config, res: Results, topics: list[str], path: str, rate: float
) -> None:
    for batch in cfg.latency_batches:
        label = f"latency, batch {batch}" + ("" if path == "framework" else f", {PATHS[path]}")
        leg = Leg(peers.latency_key(path, batch), label, path, batch=batch)
        res.legs.append(leg)
        for repeat in range(1, cfg.repeats + 1):
            topic = f"{env.run_id}-lat{batch}-{path}-{repeat}"
            await legs.make_topics(env, topic, cfg.partitions)
            topics += [topic, topic + legs.SETTLED_SUFFIX]
            payloads = Payloads(f"{topic}", cfg.dup_ratio, seed=batch + repeat)

            async def offer(topic: str = topic, payloads: Payloads = payloads) -> Dataset:
                return await dataset.produce_paced(
                    env.bootstrap, topic, cfg.partitions, rate, cfg.latency_s, payloads
                )

            env.say(f"[latency] {path}, batch {batch} #{repeat}: offering {rate:,.0f} msg/s")
            empty = Dataset(topic, cfg.partitions, {p: [] for p in range(cfg.partitions)})
            result = await legs.run_leg(
                dataclasses.replace(env, batch=batch),
                leg,
                repeat,
                empty,
                offer=offer,
                latency=True,
            )
            result.offered_msgs_s = rate
            res.runs.setdefault(leg.key, []).append(result)
            lat = result.latency
            env.say(
                _line(leg, result)
                + (f"; p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms" if lat else "")
            )
            await legs.forget_redis_keys(env.redis_url, env.run_id)


async def _profile(env: Env, data: Dataset, res: Results, path: str) -> None:
    """One framework leg under pyinstrument; the report goes to the run's log folder."""
    leg = Leg(path, f"{path}, 1 worker (profiled)", path)
    res.legs = [leg]
    res.profile_path = env.log_dir / "profile.txt"
    env.say(f"[profile] {leg.label}")
    result = await legs.run_leg(env, leg, 1, data, extra={"profile": str(res.profile_path)})
    res.runs[leg.key] = [result]
    env.say(_line(leg, result))
