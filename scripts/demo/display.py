"""The live view of a demo run (rich): progress, what happened to each message, and events.

On a terminal it redraws in place; otherwise (CI, a pipe) it prints events as they happen and
a status line every few seconds, so a log of the run reads the same story.
"""

from __future__ import annotations

from collections import deque
from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from scripts.demo.probe import Sample

_PLAIN_EVERY_S = 5.0


def clock(t_s: float) -> str:
    return f"{int(t_s) // 60}:{int(t_s) % 60:02d}"


class Display:
    """Call :meth:`update` with each sample and :meth:`event` for each thing that happens."""

    def __init__(self, console: Console, title: str, expected: int) -> None:
        self.console = console
        self.title = title
        self.expected = expected
        self.events: deque[str] = deque(maxlen=8)
        self.samples: deque[Sample] = deque(maxlen=6)
        self.workers: list[int] = []
        self.live: Live | None = None
        self._last_plain = -_PLAIN_EVERY_S

    def __enter__(self) -> Display:
        if self.console.is_terminal:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(et, ev, tb)
            self.live = None

    def event(self, t_s: float, text: str) -> None:
        line = f"{clock(t_s)}  {text}"
        self.events.append(line)
        if self.live is None:
            self.console.print(line, highlight=False)
        else:
            self.live.update(self._render())

    def update(self, sample: Sample, workers: list[int]) -> None:
        self.samples.append(sample)
        self.workers = workers
        if self.live is not None:
            self.live.update(self._render())
        elif sample.t_s - self._last_plain >= _PLAIN_EVERY_S:
            self._last_plain = sample.t_s
            s = sample
            self.console.print(
                f"{clock(s.t_s)}  sent {s.sent:,}  consumed {s.consumed:,} ({self.rate():,.0f}/s)"
                f"  applied {s.applied:,}  duplicates {s.duplicates:,}  conflicts {s.conflicts:,}"
                f"  dead letters {s.dead_letters:,}  lag {s.lag:,}  outbox {s.backlog:,}",
                highlight=False,
            )

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        a, b = self.samples[0], self.samples[-1]
        return (b.consumed - a.consumed) / max(b.t_s - a.t_s, 1e-9)

    def _render(self) -> RenderableType:
        s = self.samples[-1] if self.samples else Sample(0, 0, 0, 0, 0, 0, 0, 0)
        bars = Table.grid(padding=(0, 2))
        for label, done in (("sent", s.sent), ("consumed", s.consumed)):
            bars.add_row(
                label,
                ProgressBar(total=max(self.expected, 1), completed=done, width=44),
                f"{done:>7,} / {self.expected:,}",
            )
        bars.add_row("", "", f"{self.rate():>7,.0f} msg/s")

        counts = Table.grid(padding=(0, 2))
        counts.add_column(justify="left", style="bold")
        counts.add_column(justify="right")
        counts.add_column(style="dim")
        rows = [
            ("applied", s.applied, "handler ran once; ledger, balance, event, gateway charge"),
            ("duplicates", s.duplicates, "same key, same payload: skipped (reply re-sent)"),
            ("conflicts", s.conflicts, "same key, other payload: refused, to .conflicts"),
            (
                "dead letters",
                s.dead_letters,
                f"{s.malformed:,} malformed + {s.rejected:,} overdrafts rejected, to .dlq",
            ),
            ("lag", s.lag, "records sent but not consumed yet"),
            ("outbox", s.backlog, "events, replies, dead letters not yet published by the relay"),
        ]
        for name, value, what in rows:
            counts.add_row(name, f"{value:,}", what)

        workers = Text(f"workers: {len(self.workers)} running  (pids {self.workers})", "cyan")
        events = Text.from_markup("\n".join(self.events) or "starting")
        return Panel(
            Group(bars, Text(""), counts, Text(""), workers, Text(""), events),
            title=self.title,
            title_align="left",
        )
