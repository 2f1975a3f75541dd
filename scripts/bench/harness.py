"""The worker side of the orchestrator protocol: control lines in, JSON lines out, a meter.

A benchmark worker announces its partitions, waits for ``go`` on stdin, and on ``stop`` (or
its record limit) prints one ``report``: first and last batch wall-clock times, the CPU
seconds it spent between them (``getrusage``), how many records it consumed and, when asked,
the time from each record's producer timestamp to the commit that applied it.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from consumer.message import Message


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Control:
    """``go`` and ``stop`` from the orchestrator, read from stdin on a thread."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.stop = asyncio.Event()
        self.on_stop: list[Callable[[], None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()

        def read() -> None:
            for line in sys.stdin:
                word = line.strip()
                if word == "go":
                    loop.call_soon_threadsafe(self.go.set)
                elif word == "stop":
                    break
            loop.call_soon_threadsafe(self.request_stop)  # "stop" or the orchestrator is gone

        threading.Thread(target=read, daemon=True).start()

    def request_stop(self) -> None:
        self.stop.set()
        for fn in self.on_stop:
            fn()

    async def wait_go(self) -> bool:
        """Wait for ``go``; False if ``stop`` came first."""
        waiters = [asyncio.ensure_future(self.go.wait()), asyncio.ensure_future(self.stop.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        return self.go.is_set() and not self.stop.is_set()


class Meter:
    """First/last batch times, CPU between them, records consumed, commit latencies."""

    def __init__(self, progress_every_s: float = 5.0) -> None:
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.cpu0 = self.cpu1 = 0.0
        self.consumed = 0
        self.latencies_ms: list[float] = []
        self._progress_every_s = progress_every_s
        self._next_progress = 0.0

    def started(self) -> None:
        if self.first_ts is None:
            self.first_ts = time.time()
            self.cpu0 = cpu_s()
            self._next_progress = time.monotonic() + self._progress_every_s

    def done(self, n: int) -> None:
        self.last_ts = time.time()
        self.cpu1 = cpu_s()
        self.consumed += n
        if time.monotonic() >= self._next_progress:
            self._next_progress = time.monotonic() + self._progress_every_s
            emit({"event": "progress", "consumed": self.consumed})

    def committed(self, messages: Sequence[Message]) -> None:
        now_ms = time.time() * 1000
        self.latencies_ms.extend(now_ms - m.timestamp_ms for m in messages if m.timestamp_ms)

    def report(self, **extra: Any) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

        return {
            "event": "report",
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "cpu_s": self.cpu1 - self.cpu0,
            "consumed": self.consumed,
            "latency": {
                "count": len(lat),
                "p50_ms": pct(0.50),
                "p90_ms": pct(0.90),
                "p99_ms": pct(0.99),
                "max_ms": lat[-1] if lat else None,
            },
            **extra,
        }


async def watch_assignment(assignment: Callable[[], Any]) -> None:
    """Announce every change of this member's partitions (the orchestrator waits on them)."""
    last: list[int] | None = None
    while True:
        try:
            now = sorted(tp.partition for tp in assignment())
        except Exception:  # not started yet, or stopping
            now = []
        if now != last:
            emit({"event": "assigned", "partitions": now})
            last = now
        await asyncio.sleep(0.05)
