"""``make demo``: the payments service under duplicates, conflicts and a crash, then audited.

One run, start to end: apply migrations, create this run's topics, start the workers (with
their outbox relays) under the supervisor, send the load generator's traffic, SIGKILL one
worker midway while a live view shows what happens to the messages, wait until everything is
consumed and published, audit the database and the topics against the load generator's ground
truth, print the verdict, draw a chart. Exits 0 only when every check holds.

    python -m scripts.demo [--count 50000] [--workers 3] [--keep] [--no-kill] ...

It stops the processes it started unless ``--keep``; the services stay up
(``make services-down`` stops them). Worker and load generator output goes to
``out/demo-<run>/*.log``, not to the screen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from consumer import load_settings
from scripts.demo import chart, report
from scripts.demo.audit import Check, run_audit
from scripts.demo.display import Display
from scripts.demo.fleet import Fleet
from scripts.demo.probe import Probe, Sample
from scripts.demo.setup import (
    REQUESTED_PARTITIONS,
    create_topics,
    load_app_for,
    migrate,
    unreachable,
)
from scripts.toolkit import processes
from scripts.toolkit.truth import Truth

RET_OK, RET_AUDIT, RET_SETUP, RET_STALLED = 0, 1, 2, 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=50_000, help="records to send, copies included")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--tenants", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rate", type=float, default=0.0, help="records per second; 0 = flat out")
    p.add_argument("--no-kill", dest="kill", action="store_false", help="do not SIGKILL a worker")
    p.add_argument("--keep", action="store_true", help="leave the workers running at the end")
    p.add_argument("--timeout-s", type=float, default=480.0, help="give up waiting after this")
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("--run", default="", help="run id (default: random)")
    return p.parse_args(argv)


class Demo:
    """One run. ``main`` returns the exit code; ``finally`` blocks stop what it started."""

    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.a = args
        self.console = console
        self.settings = load_settings()
        self.run = args.run or secrets.token_hex(3)
        self.names, self.module = load_app_for(self.run, args.tenants)
        self.out = args.out / f"demo-{self.run}"
        self.samples: list[Sample] = []
        self.marks: list[tuple[float, str]] = []
        self.crash: dict[str, float | int] = {}
        self.started = time.monotonic()

    async def main(self) -> int:
        a, names = self.a, self.names
        report.intro(self.console, names, a)
        down = unreachable(self.settings)
        if down:
            self.console.print(f"[red]{', '.join(down)} not answering: run `make services`.")
            return RET_SETUP
        self.out.mkdir(parents=True, exist_ok=True)
        applied = await migrate(self.settings, self.module)
        await create_topics(self.settings, names)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        fleet = Fleet(a.workers, env, self.out / "workers.log")
        probe = Probe(
            self.settings.postgres_dsn, self.settings.kafka_bootstrap, names, self.started
        )
        loadgen: subprocess.Popen[bytes] | None = None
        try:
            fleet.start()
            await probe.start()
            title = (
                f"dedup-consumer demo · run {self.run} · {a.workers} workers · {a.count:,} records"
            )
            with Display(self.console, title, a.count) as display:
                display.event(
                    0,
                    f"migrations: {len(applied)} new; topics created "
                    f"({names.requested}: {REQUESTED_PARTITIONS} partitions)",
                )
                if not await self._wait_workers(fleet, display):
                    return RET_SETUP
                loadgen = self._start_loadgen(env)
                display.event(
                    self._t(),
                    f"load generator sending {a.count:,} records (log: {self.out}/loadgen.log)",
                )
                code = await self._watch(fleet, probe, loadgen, display)
            if code != RET_OK:
                return code
            final = await probe.sample()
            truth = Truth.read(self.out / "truth.jsonl")
            result = await run_audit(
                truth, names, self.settings.postgres_dsn, self.settings.kafka_bootstrap, final
            )
            png = chart.draw(self.samples, self.marks, self.out / "demo.png", f"run {self.run}")
            shutil.copyfile(png, a.out / "demo.png")
            self._write_summary(final, result.checks)
            report.summary(self.console, truth, result, final, self.crash, self.out, png)
            return RET_OK if result.ok else RET_AUDIT
        finally:
            if loadgen is not None and loadgen.poll() is None:
                loadgen.terminate()
                loadgen.wait(10)
            await probe.close()
            if a.keep:
                report.kept(self.console, fleet)
            else:
                fleet.stop()
                report.stopped(self.console)

    def _t(self) -> float:
        return time.monotonic() - self.started

    async def _wait_workers(self, fleet: Fleet, display: Display) -> bool:
        deadline = time.monotonic() + 60
        while len(pids := fleet.worker_pids()) < self.a.workers:
            if not fleet.alive or time.monotonic() > deadline:
                display.event(self._t(), f"[red]workers did not start; see {fleet.log_path}")
                return False
            await asyncio.sleep(0.2)
        display.event(
            self._t(), f"{len(pids)} workers up under the supervisor, each with an outbox relay"
        )
        return True

    def _start_loadgen(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        a = self.a
        cmd = [
            sys.executable,
            "-m",
            "handlers.loadgen",
            "--count",
            str(a.count),
            "--seed",
            str(a.seed),
            "--tenants",
            str(a.tenants),
            "--rate",
            str(a.rate),
            "--run",
            f"demo-{self.run}",
            "--truth",
            str(self.out / "truth.jsonl"),
        ]
        return processes.spawn(cmd, env, self.out / "loadgen.log")

    async def _watch(
        self, fleet: Fleet, probe: Probe, loadgen: subprocess.Popen[bytes], display: Display
    ) -> int:
        a = self.a
        kill_at = a.count // 2 if a.kill else None
        before: set[int] = set()
        sent_done = stall_told = False
        progress = (0, 0.0)  # (consumed, when it last moved)
        deadline = time.monotonic() + a.timeout_s
        while True:
            s = await probe.sample()
            self.samples.append(s)
            pids = fleet.worker_pids()
            display.update(s, pids)
            if not sent_done and loadgen.poll() is not None:
                if loadgen.returncode != 0:
                    display.event(s.t_s, f"[red]load generator failed; see {self.out}/loadgen.log")
                    return RET_SETUP
                sent_done = True
                display.event(s.t_s, f"load generator done: {s.sent:,} records in the topic")
            if kill_at is not None and "killed_pid" not in self.crash and s.consumed >= kill_at:
                before = set(pids)
                victim = fleet.kill_one()
                if victim is not None:
                    self.crash.update(killed_pid=victim, at_s=s.t_s, at_consumed=s.consumed)
                    self.marks.append((s.t_s, "SIGKILL"))
                    display.event(
                        s.t_s,
                        f"[bold red]SIGKILL worker pid {victim}[/] at {s.consumed:,} consumed: "
                        "no drain, no commit, no leaving the group",
                    )
            if "killed_pid" in self.crash and "restart_s" not in self.crash:
                if new := fleet.new_pids(before):
                    took = s.t_s - float(self.crash["at_s"])
                    self.crash.update(new_pid=new[0], restart_s=took)
                    self.marks.append((s.t_s, "restarted"))
                    display.event(
                        s.t_s,
                        f"supervisor restarted it as pid {new[0]} ({took:.1f}s later); "
                        "its partitions move once the group notices",
                    )
            if s.consumed != progress[0] or not s.lag:
                progress = (s.consumed, s.t_s)
            elif "killed_pid" in self.crash and not stall_told and s.t_s - progress[1] >= 5:
                stall_told = True
                display.event(s.t_s, self._stall_text())
            if not fleet.alive:
                display.event(s.t_s, f"[red]the supervisor exited; see {fleet.log_path}")
                return RET_STALLED
            all_in = sent_done and s.consumed == s.sent == a.count
            if all_in and not any(label == "all consumed" for _, label in self.marks):
                self.marks.append((s.t_s, "all consumed"))
            if all_in and s.backlog == 0:
                display.event(
                    s.t_s, "everything consumed, and every event, reply and dead letter published"
                )
                return RET_OK
            if time.monotonic() > deadline:
                display.event(
                    s.t_s,
                    f"[red]gave up after {a.timeout_s:.0f}s (lag {s.lag:,}, outbox {s.backlog:,})",
                )
                return RET_STALLED
            await asyncio.sleep(0.5)

    def _stall_text(self) -> str:
        st = self.settings
        return (
            "paused on the dead worker's partitions: the group reassigns them once it "
            f"notices (session timeout {st.session_timeout_ms / 1000:.0f}s), and keys it was "
            "handling when it died (leased, never committed) wait for their Redis lease to "
            f"expire ({st.lease_ms / 1000:.0f}s); the lease only stops two workers running one "
            "key at once, the inbox is the fence"
        )

    def _write_summary(self, final: Sample, checks: list[Check]) -> None:
        data = {
            "run": self.run,
            "names": asdict(self.names),
            "args": {k: str(v) for k, v in vars(self.a).items()},
            "final": asdict(final),
            "crash": self.crash,
            "checks": [asdict(c) for c in checks],
            "samples": [asdict(s) for s in self.samples],
        }
        (self.out / "summary.json").write_text(json.dumps(data, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if not console.is_terminal:  # a log file or CI: wide lines rather than wrapped tables
        console = Console(width=120)
    try:
        return asyncio.run(Demo(args, console).main())
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; workers stopped")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
