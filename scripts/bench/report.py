"""What a run prints and writes: the summary JSON, a rich table, a PNG chart, the doc section.

A leg's figure is the median of its repeats, with min-max. A leg with any repeat that failed
(error, or the exactly-once check) has no figure: it is listed under ``failures`` and the
run exits non-zero. Only the block between the markers in docs/benchmarks.md is rewritten;
the prose around it is kept.
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Any

from rich.table import Table

from scripts.bench import peers
from scripts.bench.legs import LegRun
from scripts.bench.runner import Results

BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _ok(runs: list[LegRun]) -> bool:
    return bool(runs) and all(r.ok and not r.error for r in runs)


def summarize(res: Results) -> dict[str, Any]:
    cfg = res.config
    legs: dict[str, Any] = {}
    failures: list[str] = []
    for leg in res.legs:
        runs = res.runs.get(leg.key, [])
        ok = _ok(runs)
        for r in runs:
            if r.error or not r.ok:
                failures.append(f"{leg.key} #{r.repeat}: {r.error or r.check}")
        entry: dict[str, Any] = {
            "label": leg.label,
            "ok": ok,
            "workers": leg.workers,
            "msgs_s": _spread([r.msgs_s for r in runs]) if ok else None,
            "cpu_us_per_msg": _spread([r.cpu_us_per_msg for r in runs]) if ok else None,
            "services_cpu_us_per_msg": _spread([r.services_us_per_msg for r in runs])
            if ok
            else None,
            "load_1m": _spread([r.load for r in runs if r.load]),
            "records": runs[0].records if runs else 0,
            "check": runs[-1].check if runs else "",
            "runs": [
                {
                    "repeat": r.repeat,
                    "records": r.records,
                    "seconds": round(r.seconds, 3),
                    "msgs_s": round(r.msgs_s, 1),
                    "cpu_s": round(r.cpu_s, 3),
                    "services_cpu_s": {k: round(v, 2) for k, v in r.services_cpu_s.items()},
                    "load_1m": round(r.load, 2),
                    "ok": r.ok,
                    "error": r.error,
                    "latency": r.latency or None,
                }
                for r in runs
            ],
        }
        if leg.key.startswith("latency") and ok:
            entry["p50_ms"] = _spread([r.latency["p50_ms"] for r in runs])
            entry["p99_ms"] = _spread([r.latency["p99_ms"] for r in runs])
            entry["max_ms"] = _spread([r.latency["max_ms"] for r in runs])
            entry["samples"] = sum(r.latency["count"] for r in runs)
        if leg.key.startswith("latency"):
            entry["path"], entry["batch"] = leg.mode, leg.batch
            entry["offered_msgs_s"] = (
                round(statistics.median(r.offered_msgs_s for r in runs), 1) if runs else 0.0
            )
        legs[leg.key] = entry

    def rate(key: str) -> float | None:
        m = legs.get(key, {}).get("msgs_s")
        return round(m["median"], 1) if m else None

    raw, fw, naive = rate("raw"), rate("framework"), rate("naive")
    by_workers = {"1": fw, **{str(n): rate(f"workers{n}") for n in cfg.workers}}
    latency_by_batch = {
        str(b): {
            "p50_ms": legs[k]["p50_ms"]["median"],
            "p99_ms": legs[k]["p99_ms"]["median"],
            "p50_ms_range": [legs[k]["p50_ms"]["min"], legs[k]["p50_ms"]["max"]],
            "p99_ms_range": [legs[k]["p99_ms"]["min"], legs[k]["p99_ms"]["max"]],
            "samples": legs[k]["samples"],
        }
        for b in cfg.latency_batches
        if (k := f"latency{b}") in legs and legs[k].get("p50_ms")
    }
    main_lat = latency_by_batch.get(str(cfg.batch)) or next(iter(latency_by_batch.values()), {})
    return {
        "date": res.started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "command": cfg.command,
        "run_id": res.run_id,
        "batch": cfg.batch,
        "repeats": cfg.repeats,
        "partitions": cfg.partitions,
        "dup_ratio": cfg.dup_ratio,
        "naive_records": min(cfg.naive_records, cfg.records),
        "relay": "disabled during all legs",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "postgres": res.pg,
        "load_1m_before": round(res.load_before, 2),
        "load_1m_after": round(res.load_after, 2),
        "offered_msgs_s": round(res.offered_msgs_s, 1),
        "legs": legs,
        "failures": failures,
        "raw_msgs_s": raw,
        "framework_msgs_s": fw,
        "naive_msgs_s": naive,
        "pg_only_msgs_s": rate("pg_only"),
        # The per-message path with CONSUMER_OPTIMISTIC=true (opt-in, docs/handlers.md).
        "optimistic_msgs_s": rate("optimistic"),
        "optimistic_ratio_vs_naive": round(o / naive, 2)
        if (o := rate("optimistic")) and naive
        else None,
        "framework_msgs_s_by_workers": by_workers,
        "ratio_vs_raw": round(fw / raw, 3) if fw and raw else None,
        # ratio_vs_naive/competent/limit, batch_ratio_vs_..., ..._by_workers, p99_ms_by_batch
        **peers.figures(legs, cfg.workers, cfg.latency_batches),
        "p50_ms": round(main_lat["p50_ms"], 1) if main_lat else None,
        "p99_ms": round(main_lat["p99_ms"], 1) if main_lat else None,
        "latency_by_batch": latency_by_batch,
        "cpu_us_per_msg": {
            k: round(v["cpu_us_per_msg"]["median"], 1)
            for k, v in legs.items()
            if v["cpu_us_per_msg"] and not k.startswith("latency")
        },
        "services_cpu_us_per_msg": {
            k: round(v["services_cpu_us_per_msg"]["median"], 1)
            for k, v in legs.items()
            if v["services_cpu_us_per_msg"] and not k.startswith("latency")
        },
        "records": cfg.records,
        "seconds": round(res.seconds, 1),
    }


def _fmt(spread: dict[str, float] | None, digits: int = 0) -> tuple[str, str]:
    if not spread:
        return "FAILED", ""
    return (
        f"{spread['median']:,.{digits}f}",
        f"{spread['min']:,.{digits}f}-{spread['max']:,.{digits}f}",
    )


def rows(summary: dict[str, Any]) -> list[list[str]]:
    """Throughput rows: leg, msgs/s, min-max, vs raw, CPU µs/msg, services µs/msg, load, check."""
    raw = summary["raw_msgs_s"]
    out = []
    for key, leg in summary["legs"].items():
        if key.startswith("latency"):
            continue
        med, rng = _fmt(leg["msgs_s"])
        ratio = f"{leg['msgs_s']['median'] / raw:.2f}" if leg["msgs_s"] and raw else ""
        cpu, _ = _fmt(leg["cpu_us_per_msg"])
        svc, _ = _fmt(leg["services_cpu_us_per_msg"])
        load = f"{leg['load_1m']['median']:.1f}" if leg["load_1m"] else ""
        check = "yes" if leg["ok"] else "NO"
        out.append([leg["label"], f"{leg['records']:,}", med, rng, ratio, cpu, svc, load, check])
    return out


HEADERS = [
    "leg",
    "records",
    "msgs/s (median)",
    "min-max",
    "vs raw",
    "client CPU µs/msg",
    "services CPU µs/msg",
    "load 1m",
    "exactly once",
]
LAT_HEADERS = ["path", "batch", "offered msgs/s", "consumed msgs/s", "p50 ms", "p50 min-max",
               "p99 ms", "p99 min-max", "samples", "exactly once"]  # fmt: skip


def latency_rows(summary: dict[str, Any]) -> list[list[str]]:
    out = []
    for key, leg in summary["legs"].items():
        if not key.startswith("latency"):
            continue
        p50, r50 = _fmt(leg.get("p50_ms"), 1)
        p99, r99 = _fmt(leg.get("p99_ms"), 1)
        consumed, _ = _fmt(leg["msgs_s"])
        offered = leg.get("offered_msgs_s", summary["offered_msgs_s"])  # older summaries
        out.append(
            [
                peers.PATHS.get(leg.get("path", "framework"), ""),
                str(leg.get("batch") or key.removeprefix("latency")),
                f"{offered:,.0f}",
                consumed,
                p50,
                r50,
                p99,
                r99,
                f"{leg.get('samples', 0):,}",
                "yes" if leg["ok"] else "NO",
            ]
        )
    return out


def tables(summary: dict[str, Any]) -> list[Table]:
    t = Table(title=f"Throughput ({summary['records']:,} records, batch {summary['batch']})")
    for h in HEADERS:
        t.add_column(h, justify="left" if h == "leg" else "right")
    for row in rows(summary):
        t.add_row(*row)
    lt = Table(title="Latency: producer timestamp -> database commit")
    for h in LAT_HEADERS:
        lt.add_column(h, justify="right")
    for row in latency_rows(summary):
        lt.add_row(*row)
    return [t, lt]


def chart(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legs = [(k, v) for k, v in summary["legs"].items() if not k.startswith("latency")]
    lat = [
        (f"{v.get('batch') or k.removeprefix('latency')}", v)
        for k, v in summary["legs"].items()
        if "p50_ms" in v
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=(3, 2))
    names = [v["label"] for _, v in legs]
    med = [v["msgs_s"]["median"] if v["msgs_s"] else 0 for _, v in legs]
    lo = [m - v["msgs_s"]["min"] if v["msgs_s"] else 0 for m, (_, v) in zip(med, legs, strict=True)]
    hi = [v["msgs_s"]["max"] - m if v["msgs_s"] else 0 for m, (_, v) in zip(med, legs, strict=True)]
    ax1.barh(names, med, xerr=[lo, hi], color="#4878a8", capsize=3)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    ax1.set_xlabel("messages/s (log scale; median, min-max)")
    for i, m in enumerate(med):
        # Right of the error bar, so the figure and the whisker do not overlap.
        x = (m + hi[i]) * 1.15 if m else 1
        ax1.text(x, i, f"{m:,.0f}" if m else "FAILED", va="center", fontsize=8)
    ax1.set_xlim(right=max(m + h for m, h in zip(med, hi, strict=True)) * 4 if med else None)
    ax1.set_title(f"Throughput, batch {summary['batch']}, {summary['records']:,} records")
    if lat:
        x = range(len(lat))
        p50 = [v["p50_ms"]["median"] for _, v in lat]
        p99 = [v["p99_ms"]["median"] for _, v in lat]
        ax2.bar([i - 0.2 for i in x], p50, width=0.4, label="p50", color="#6aa56a")
        ax2.bar([i + 0.2 for i in x], p99, width=0.4, label="p99", color="#c0504d")
        for i, (b, _) in enumerate(lat):
            target = 120 if int(b) > 100 else 25
            ax2.hlines(target, i - 0.45, i + 0.45, colors="black", linestyles="dashed")
            ax2.text(i - 0.2, p50[i], f"{p50[i]:.0f}", ha="center", va="bottom", fontsize=8)
            ax2.text(i + 0.2, p99[i], f"{p99[i]:.0f}", ha="center", va="bottom", fontsize=8)
        ax2.set_xticks(
            list(x), [f"{v.get('path', 'framework')}\nbatch {b}" for b, v in lat], fontsize=7
        )
        ax2.set_ylabel("ms (dashed: p99 target)")
        ax2.legend()
        ax2.set_title("Latency to commit (half each path's rate)")
    else:
        ax2.set_axis_off()
    fig.suptitle(
        f"dedup-consumer benchmark, {summary['date']}, {summary['cpus']} CPUs, load average "
        f"(1 min) {summary['load_1m_before']} before, {summary['load_1m_after']} after"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _md_table(headers: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def targets(summary: dict[str, Any]) -> list[str]:
    """The issue's targets against this run: one line each, met or not."""
    lat = summary["latency_by_batch"]
    checks: list[tuple[str, float | None, float, bool]] = [
        ("`ratio_vs_naive` >= 10", summary["ratio_vs_naive"], 10, True),
        ("`ratio_vs_raw` >= 0.25", summary["ratio_vs_raw"], 0.25, True),
        *peers.targets(summary),
    ]
    for batch, figures in lat.items():
        limit = 120.0 if int(batch) > 100 else 25.0
        checks.append((f"p99 <= {limit:.0f} ms at batch {batch}", figures["p99_ms"], limit, False))
    out = []
    for name, value, limit, at_least in checks:
        if value is None:
            out.append(f"- {name}: not measured")
            continue
        met = value >= limit if at_least else value <= limit
        out.append(f"- {name}: {value:,.3g} ({'met' if met else 'NOT met'})")
    return out


def markdown(summary: dict[str, Any], chart_rel: str) -> str:
    s = summary
    fw = s["framework_msgs_s_by_workers"]
    keys = ("ratio_vs_raw", "ratio_vs_naive", "ratio_vs_competent", "ratio_vs_limit",
            "batch_ratio_vs_competent", "batch_ratio_vs_limit", "p50_ms", "p99_ms")  # fmt: skip
    failures = "".join(f"\n- FAILED: {f}" for f in s["failures"]) or "\n- none"
    by_workers = "\n".join(
        f"{label} by workers (msgs/s): "
        + ", ".join(f"{n}: {v:,.0f}" if v else f"{n}: -" for n, v in rates.items())
        + "."
        for label, rates in (
            ("Framework", fw),
            ("Framework, batch handler", s.get("framework_batch_msgs_s_by_workers") or {}),
            ("Competent", s.get("competent_msgs_s_by_workers") or {}),
            ("Limit", s.get("limit_msgs_s_by_workers") or {}),
        )
    )
    return f"""{BEGIN}
_Generated by `{s["command"]}` on {s["date"]} (run `{s["run_id"]}`, {s["seconds"]:.0f} s).
Machine: {s["cpus"]} CPUs, Python {s["python"]}, PostgreSQL fsync={s["postgres"].get("fsync")}
synchronous_commit={s["postgres"].get("synchronous_commit")}; load average (1 min)
{s["load_1m_before"]} before, {s["load_1m_after"]} after. {s["repeats"]} repeat(s) per leg;
{s["records"]:,} records ({s["dup_ratio"]:.0%} duplicates, {s["partitions"]} partitions);
the naive leg consumed the first {s["naive_records"]:,}. Relay: {s["relay"]}._

{_md_table(HEADERS, rows(s))}

{_md_table(LAT_HEADERS, latency_rows(s))}

{by_workers}
{", ".join(f"`{k}` = {s[k]}" for k in keys)}.

Targets (see "The targets" above):
{chr(10).join(targets(s))}

Failures:{failures}

![throughput and latency]({chart_rel})
{END}"""


def write_doc(summary: dict[str, Any], doc: Path, chart_path: Path) -> None:
    section = markdown(summary, os.path.relpath(chart_path, doc.parent))
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n## Latest results\n\n" + section + "\n"
    doc.write_text(text)
