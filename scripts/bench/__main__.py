"""``python -m scripts.bench [options]`` (``make bench ARGS="..."``): see docs/benchmarks.md.

Progress goes to stderr, one line per leg. stdout carries the tables and, as its last line,
one JSON object with the figures. Exit status: 0 when every leg passed its exactly-once
check, 1 otherwise. The whole summary is kept in out/bench/<run>/summary.json;
``python -m scripts.bench --redraw out/bench/<run>/summary.json`` redraws chart and doc.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from pathlib import Path

from rich.console import Console

from consumer.cli.common import console
from scripts.bench import report, runner
from scripts.bench.legs import ROOT

DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "bench" / "results.png"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse(argv: list[str]) -> runner.Config:
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__)
    p.add_argument("--records", type=int, default=200_000, help="records in the topic")
    p.add_argument("--repeats", type=int, default=3, help="runs of each leg (median, min-max)")
    p.add_argument("--batch", type=int, default=500, help="max records per partition batch")
    p.add_argument("--partitions", type=int, default=6)
    p.add_argument("--dup-ratio", type=float, default=0.10)
    p.add_argument(
        "--naive-records",
        type=int,
        default=20_000,
        help="the naive leg consumes only this many records (it is 10-20x slower)",
    )
    p.add_argument("--workers", type=_ints, default=(2, 4), help="worker counts, e.g. 2,4")
    p.add_argument("--latency-batches", type=_ints, default=(500, 100))
    p.add_argument("--latency-s", type=float, default=15.0, help="seconds of offered load")
    p.add_argument(
        "--latency-rate", type=float, default=None, help="offered msgs/s for every path "
        "(default: half of each path's measured median)",
    )  # fmt: skip
    p.add_argument(
        "--legs",
        default="",
        help="comma-separated subset: raw,framework,competent,limit,pg_only,optimistic,naive,"
        "workers2,competent_workers2,limit_workers2 (likewise for each --workers count),latency",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small run: 20,000 records, 1 repeat, 5,000 naive, 6 s of latency load",
    )
    p.add_argument(
        "--profile",
        nargs="?",
        const="framework",
        default="",
        choices=["framework", "framework_batch"],
        help="profile one leg of this path only (default: framework)",
    )
    p.add_argument(
        "--experiment",
        default="",
        choices=[""],  # none at the moment; "no-savepoints" became the optimistic path (issue 15)
        help="what-if for the framework legs (not a framework mode; implies --no-doc)",
    )
    p.add_argument("--keep-topics", action="store_true")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    a = p.parse_args(argv)
    cfg = runner.Config(
        records=a.records,
        repeats=a.repeats,
        batch=a.batch,
        partitions=a.partitions,
        dup_ratio=a.dup_ratio,
        naive_records=a.naive_records,
        workers=a.workers,
        latency_batches=a.latency_batches,
        latency_s=a.latency_s,
        latency_rate=a.latency_rate,
        only=tuple(x.strip() for x in a.legs.split(",") if x.strip()),
        profile=a.profile,
        keep_topics=a.keep_topics,
        experiment=a.experiment,
        command="make bench" + (f' ARGS="{shlex.join(argv)}"' if argv else ""),
    )
    if a.quick:
        cfg.records, cfg.repeats = min(cfg.records, 20_000), 1
        cfg.naive_records, cfg.latency_s = min(cfg.naive_records, 5_000), 6.0
    cfg.write_doc = not (a.no_doc or a.profile or cfg.only or a.experiment)
    return cfg


def redraw(path: Path) -> int:
    """Chart and doc section again from a run's saved summary.json (no measuring)."""
    summary = json.loads(path.read_text())
    report.chart(summary, CHART)
    report.write_doc(summary, DOC, CHART)
    print(f"wrote {DOC.relative_to(ROOT)} and {CHART.relative_to(ROOT)} from {path}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--redraw"] and len(argv) == 2:
        return redraw(Path(argv[1]))
    cfg = parse(argv)
    err = Console(stderr=True, highlight=False)
    out = console(highlight=False)  # piped into a log: tables at their own width, not 80
    res = asyncio.run(runner.run(cfg, lambda line: err.print(line, markup=False)))
    summary = report.summarize(res)
    saved = ROOT / "out" / "bench" / res.run_id / "summary.json"
    saved.write_text(json.dumps(summary, indent=1))
    if res.profile_path is not None:
        err.print(f"profile: {res.profile_path} (+ .html)", markup=False)
        if res.profile_path.exists():
            out.print(res.profile_path.read_text(), markup=False)
    for table in report.tables(summary):
        out.print(table)
    if cfg.write_doc:
        report.chart(summary, CHART)
        report.write_doc(summary, DOC, CHART)
        err.print(f"wrote {DOC.relative_to(ROOT)} and {CHART.relative_to(ROOT)}", markup=False)
    elif not cfg.profile:
        chart = Path(ROOT / "out" / "bench" / res.run_id / "results.png")
        report.chart(summary, chart)
        err.print(f"chart: {chart} (docs not rewritten: partial run or --no-doc)", markup=False)
    sys.stdout.flush()
    # The last line: the figures without the per-run detail (that is in docs and the logs).
    print(json.dumps({k: v for k, v in summary.items() if k != "legs"}))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
