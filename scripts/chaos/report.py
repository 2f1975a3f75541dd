"""The campaign's output: readable tables (rich) on stdout, then one JSON line (logs: stderr).

The JSON object is always the last line of stdout, so scripts and the test can read it with
``out.splitlines()[-1]``. Figures come only from the checker and the injector's records.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from scripts.chaos.campaign import RunResult
from scripts.chaos.checker import INVARIANTS

# The broken build counts as caught only by a per-key verdict (an effect lost or doubled),
# not by offsets left unconsumed: a run that merely failed to drain proves nothing.
CAUGHT_BY = ("lost", "double_applied", "conflicts_applied", "rejects_applied")


def caught(broken: RunResult | None) -> bool:
    return broken is not None and any(broken.check.counts[k] for k in CAUGHT_BY)


def summary(main: RunResult, broken: RunResult | None, seconds: float) -> dict[str, Any]:
    c = main.check.counts
    wl = main.workload
    faults = dict(sorted(main.faults.items()))
    out: dict[str, Any] = {
        "records": wl["records"],
        "unique_keys": wl["unique_keys"],
        "duplicates": wl["duplicate"],
        "conflicts": wl["conflict"],
        "malformed": wl["malformed"],
        "rejects": wl["rejects"],
        "faults": faults,
        "fault_kinds": len(faults),
        "faults_total": sum(faults.values()),
        "applied": c["applied"],
        "rejected": c["rejected"],
        "double_applied": c["double_applied"],
        "lost": c["lost"],
        "conflicts_applied": c["conflicts_applied"],
        "rejects_applied": c["rejects_applied"],
        "unclassified": c["unclassified"],
        "unexpected_dead_letters": c["unexpected_dead_letters"],
        "unexpected_effects": c["unexpected_effects"],
        "inbox_mismatch": c["inbox_mismatch"],
        "consumed": c["consumed"],
        "applied_offsets": c["applied_offsets"],
        "duplicate_offsets": c["duplicate_offsets"],
        "conflict_offsets": c["conflict_offsets"],
        "dead_lettered": c["dead_lettered"],
        "downstream_duplicates": c["downstream_duplicates"],
        "downstream_lost": c["downstream_lost"],
        "relay_republished": c["relay_republished"],
        "producer_copies": c["producer_copies"],
        "aborted_applied": c["aborted_applied"],
        "aborted_offsets": c["aborted_offsets"],
        "lost_by_operator": c["lost_by_operator"],
        "rejections_repeated": c["rejections_repeated"],
        "drained": main.drained,
        "checker_caught_broken_build": int(caught(broken)),
        "broken_build_violations": broken.check.violations if broken else None,
        "seconds": round(seconds, 1),
        "seed": main.cfg.seed,
        "workers": main.cfg.workers,
    }
    out["ok"] = bool(main.check.ok and main.drained and out["checker_caught_broken_build"])
    return out


def render(main: RunResult, broken: RunResult | None, s: dict[str, Any]) -> None:
    console = Console(highlight=False, width=110)
    wl = Table(title=f"workload (seed {s['seed']})", show_header=False)
    for k, v in main.workload.items():
        wl.add_row(k, str(v))
    console.print(wl)

    ft = Table(title="faults injected (took effect)")
    ft.add_column("kind")
    ft.add_column("count", justify="right")
    for kind, n in s["faults"].items():
        ft.add_row(kind, str(n))
    ft.add_row("[b]total[/b]", f"[b]{s['faults_total']}[/b] in {s['fault_kinds']} kinds")
    console.print(ft)

    ev = Table(title="fault timeline")
    for col in ("t (s)", "kind", "detail"):
        ev.add_column(col)
    for e in main.events:
        mark = "" if e["took"] else " [dim](no effect)[/dim]"
        ev.add_row(f"{e['t_s']:.1f}", e["kind"], e["detail"] + mark)
    console.print(ev)

    ct = Table(title="checker")
    ct.add_column("figure")
    ct.add_column("main run", justify="right")
    ct.add_column("broken build", justify="right")
    shown = [
        "applied",
        "rejected",
        "consumed",
        "applied_offsets",
        "duplicate_offsets",
        "conflict_offsets",
        "dead_lettered",
        "relay_republished",
        "aborted_offsets",
        "lost_by_operator",
        "rejections_repeated",
        *INVARIANTS,
    ]
    for k in shown:
        a = main.check.counts[k]
        b = broken.check.counts[k] if broken else "-"
        style = "red" if k in INVARIANTS and a else ""
        ct.add_row(k, f"[{style}]{a}[/{style}]" if style else str(a), str(b))
    console.print(ct)
    for what, examples in main.check.examples.items():
        if what in INVARIANTS:
            console.print(f"[red]{what}[/red] e.g. " + "; ".join(examples[:3]))
    verdict = "PASS" if s["ok"] else "FAIL"
    console.print(
        f"[b]{verdict}[/b]: invariants {'hold' if main.check.ok else 'VIOLATED'} in the main run;"
        f" broken build {'caught' if s['checker_caught_broken_build'] else 'NOT caught'}"
        f" ({s['broken_build_violations']}); {s['seconds']}s"
    )


def json_line(s: dict[str, Any]) -> str:
    return json.dumps(s, separators=(",", ":"), sort_keys=False)
