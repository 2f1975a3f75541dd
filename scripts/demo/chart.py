"""A PNG of a demo run: throughput, and duplicates, conflicts and dead letters over time.

Drawn with matplotlib's Agg backend (no display needed) from the samples the demo took;
vertical lines mark the events (the SIGKILL, the restart).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: no display needed
import matplotlib.pyplot as plt

from scripts.demo.probe import Sample


def _rates(samples: Sequence[Sample], field: str, window: int = 3) -> list[float]:
    """Per-second rate of a cumulative field, over a small window to smooth sampling jitter."""
    out = []
    for i, s in enumerate(samples):
        a = samples[max(i - window, 0)]
        dt = s.t_s - a.t_s
        out.append((getattr(s, field) - getattr(a, field)) / dt if dt > 0 else 0.0)
    return out


def draw(
    samples: Sequence[Sample], marks: Sequence[tuple[float, str]], path: Path, title: str
) -> Path:
    """Write the chart to ``path`` and return it."""
    t = [s.t_s for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.plot(t, _rates(samples, "consumed"), label="consumed / s", color="tab:blue")
    top.plot(t, _rates(samples, "applied"), label="applied / s", color="tab:green")
    top.plot(t, _rates(samples, "duplicates"), label="duplicates / s", color="tab:orange")
    top.set_ylabel("messages per second")
    top.set_title(title)
    top.legend(loc="center right")
    top.grid(alpha=0.3)

    bottom.plot(t, [s.duplicates for s in samples], label="duplicates", color="tab:orange")
    bottom.plot(t, [s.conflicts for s in samples], label="conflicts", color="tab:red")
    bottom.plot(t, [s.dead_letters for s in samples], label="dead letters", color="tab:purple")
    bottom.set_ylabel("messages so far")
    bottom.set_xlabel("seconds since start")
    bottom.grid(alpha=0.3)
    # Lag is an order of magnitude larger: its own axis, so the outcome curves stay readable.
    lag = bottom.twinx()
    lag.plot(
        t, [s.lag for s in samples], label="lag (right axis)", color="tab:gray", linestyle="--"
    )
    lag.set_ylabel("lag (records not yet consumed)")
    handles = bottom.get_legend_handles_labels()
    extra = lag.get_legend_handles_labels()
    bottom.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper left")

    for n, (at, label) in enumerate(marks):
        for ax in (top, bottom):
            ax.axvline(at, color="black", linestyle=":", linewidth=1)
        # Staggered, so labels of close events do not print over each other.
        top.annotate(
            label,
            (at, 0.98 - 0.1 * (n % 3)),
            xycoords=("data", "axes fraction"),
            va="top",
            ha="left",
            fontsize=8,
            xytext=(3, 0),
            textcoords="offset points",
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
