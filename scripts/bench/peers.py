"""The paths ``make bench`` compares, their leg names, and the ratios between them.

Paths: ``framework`` (the per-message handler path), ``framework_batch`` (the batch-handler
path, a batch handler doing the same work set-based), and the
peers ``competent`` and ``limit`` (handwritten.py). Each runs with 1 worker and with every
``--workers`` count; ``naive`` and ``raw`` run with 1 worker, for reference.

Ratios (the last JSON line): ``ratio_vs_<peer>`` is the per-message path's 1-worker rate over
the peer's 1-worker rate, ``batch_ratio_vs_<peer>`` the same for the batch path. Under
``..._by_workers`` the path with n workers is set against the peer with n workers (like for
like), except naive, which runs with 1 worker only. ``p99_ms_by_batch`` is
``{path: {batch: p99 ms}}``, each path offered half its own 1-worker rate.
"""

from __future__ import annotations

from typing import Any

PATHS = {
    "framework": "framework",
    "framework_batch": "framework, batch handler",
    "competent": "competent hand-written",
    "limit": "limit: fewest round trips",
}
PEERS = ("naive", "competent", "limit")


def leg_key(path: str, workers: int) -> str:
    """``framework``, ``workers2`` (the framework's historical name), ``competent_workers2``..."""
    if workers == 1:
        return path
    return f"workers{workers}" if path == "framework" else f"{path}_workers{workers}"


def latency_key(path: str, batch: int) -> str:
    """``latency500`` for the framework (as before), ``latency500_competent`` for the others."""
    return f"latency{batch}" + ("" if path == "framework" else f"_{path}")


def _ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    return round(a / b, digits) if a and b else None


def figures(
    legs: dict[str, Any], workers: tuple[int, ...], batches: tuple[int, ...]
) -> dict[str, Any]:
    """Rates by path and workers, the ratios between paths, and each path's p99 by batch."""

    def rate(key: str) -> float | None:
        m = legs.get(key, {}).get("msgs_s")
        return round(m["median"], 1) if m else None

    counts = (1, *workers)
    by_workers = {p: {str(n): rate(leg_key(p, n)) for n in counts} for p in PATHS}
    out: dict[str, Any] = {}
    for p in ("framework_batch", "competent", "limit"):
        out[f"{p}_msgs_s"] = by_workers[p]["1"]
        out[f"{p}_msgs_s_by_workers"] = by_workers[p]
    # naive runs with 1 worker only: every worker count is set against that one.
    by_workers["naive"] = {str(n): rate("naive") for n in counts}
    for prefix, path, peers in (("", "framework", PEERS), ("batch_", "framework_batch", PEERS[1:])):
        for peer in peers:
            name = f"{prefix}ratio_vs_{peer}"
            out[name] = _ratio(by_workers[path]["1"], by_workers[peer]["1"])
            out[f"{name}_by_workers"] = {
                str(n): _ratio(by_workers[path][str(n)], by_workers[peer][str(n)]) for n in counts
            }
    out["p99_ms_by_batch"] = {
        p: {
            str(b): round(legs[k]["p99_ms"]["median"], 1)
            for b in batches
            if (k := latency_key(p, b)) in legs and legs[k].get("p99_ms")
        }
        or None
        for p in PATHS
    }
    return out


def targets(s: dict[str, Any]) -> list[tuple[str, float | None, float, bool]]:
    """Issue 15's targets: (name, value, limit, at least) for report.targets."""
    competent1 = s.get("competent_msgs_s")
    batch2 = (s.get("framework_batch_msgs_s_by_workers") or {}).get("2")
    batch_p99 = (s.get("p99_ms_by_batch") or {}).get("framework_batch") or {}
    return [
        ("`batch_ratio_vs_competent` >= 0.5", s.get("batch_ratio_vs_competent"), 0.5, True),
        ("batch path, 2 workers / competent, 1 worker >= 0.8", _ratio(batch2, competent1), 0.8,
         True),
        ("batch path p99 <= 30 ms at batch 100 (half its rate)", batch_p99.get("100"), 30, False),
    ]  # fmt: skip
