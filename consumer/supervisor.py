"""The supervisor: N worker processes of one app, restarted when they die, drained on stop.

Each worker is a fresh interpreter (``python -m consumer worker MODULE:APP --id i``), not a
fork, so no event loop, socket or lock is inherited. The supervisor owns process lifecycles
only and never talks to Kafka, Redis or PostgreSQL:

* a worker that dies is restarted after a back-off that doubles with each quick failure
  (reset once a worker has lived ``stable_s``), and the log says why: exit code or signal;
* a worker that exits with RET_CONFIG, RET_IMPORT or RET_MIGRATION is not restarted (a
  restart cannot fix it): the others are drained and the supervisor exits with that code;
* SIGTERM or SIGINT is forwarded to every worker as SIGTERM; each stops fetching, finishes
  the batch in flight, commits, releases its leases and leaves the group. Workers still
  running after ``shutdown_grace_s`` are SIGKILLed, which is safe (a batch that did not
  commit is simply delivered again) but slower to recover from. A second signal skips the
  rest of the grace period.

Exit codes are in :mod:`consumer.exitcodes`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType

from consumer import metrics
from consumer.constants import MAX_BACKOFF_EXPONENT
from consumer.errors import ConfigError
from consumer.exitcodes import (
    NAMES,
    RET_CONFIG,
    RET_IMPORT,
    RET_KAFKA_AUTH,
    RET_KILLED,
    RET_MIGRATION,
    RET_OK,
    RET_TOPICS,
    RET_WORKER_FAILED,
)
from consumer.settings import Settings, load_settings

log = logging.getLogger("consumer.supervisor")

# A worker that exits with one of these would fail the same way again.
FATAL_CODES = frozenset({RET_CONFIG, RET_IMPORT, RET_MIGRATION, RET_KAFKA_AUTH, RET_TOPICS})
# Exits that are a worker obeying a stop request, not a failure.
_STOPPED = frozenset({0, -signal.SIGTERM, -signal.SIGINT})


def describe_exit(code: int) -> str:
    """``killed by SIGKILL`` / ``exited with code 3 (RET_IMPORT)``: why a worker is gone."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    name = NAMES.get(code)
    return f"exited with code {code}" + (f" ({name})" if name else "")


def backoff_s(failures: int, base_s: float, cap_s: float) -> float:
    """Delay before restarting a worker after its ``failures``-th quick failure in a row."""
    # Capped exponent: a float times 2**1024 overflows, after hours of crash-looping.
    return float(min(cap_s, base_s * 2 ** min(max(failures - 1, 0), MAX_BACKOFF_EXPONENT)))


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    last_code: int | None = None


class Supervisor:
    """Runs ``command(i)`` for i in 0..workers-1 until a signal, then drains them."""

    def __init__(
        self,
        command: Callable[[int], Sequence[str]],
        workers: int,
        *,
        grace_s: float,
        backoff_s: float,
        backoff_max_s: float,
        stable_s: float = 60.0,
        poll_s: float = 0.1,
    ) -> None:
        self.command = command
        self.slots = [_Slot(i) for i in range(workers)]
        self.grace_s = grace_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.stable_s = stable_s
        self.poll_s = poll_s
        self.stop_signal: int | None = None
        self.force = False
        self.fatal: int | None = None
        self.restarts = 0

    # Signal handlers only set flags: the loop does the logging and the signalling.
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        else:
            self.force = True

    def run(self) -> int:
        """Start the workers, keep them alive until SIGTERM/SIGINT, drain; return an exit code."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for slot in self.slots:
                self._start(slot)
            while self.stop_signal is None and self.fatal is None:
                self._reap()
                self._restart_due()
                time.sleep(self.poll_s)
            return self._drain()
        finally:
            for slot in self.slots:  # never leave a child behind, whatever happened above
                if slot.proc is not None and slot.proc.poll() is None:
                    slot.proc.kill()
                    slot.proc.wait()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.slots if s.proc is not None]

    def _start(self, slot: _Slot) -> None:
        argv = list(self.command(slot.index))
        slot.proc = subprocess.Popen(argv)
        slot.started = time.monotonic()
        slot.restart_at = None
        log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    def _reap(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is None or (code := slot.proc.poll()) is None:
                continue
            pid, lived_s = slot.proc.pid, now - slot.started
            slot.proc, slot.last_code = None, code
            metrics.mark_dead(pid)  # its gauges go; its counters stay in the totals
            if code in FATAL_CODES:
                log.error(
                    "worker %d (pid %d) %s; a restart cannot fix that, stopping",
                    slot.index,
                    pid,
                    describe_exit(code),
                )
                self.fatal = code
                return
            slot.failures = 1 if lived_s >= self.stable_s else slot.failures + 1
            delay = backoff_s(slot.failures, self.backoff_s, self.backoff_max_s)
            slot.restart_at = now + delay
            log.warning(
                "worker %d (pid %d) %s after %.1fs; restarting in %.1fs",
                slot.index,
                pid,
                describe_exit(code),
                lived_s,
                delay,
            )

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at:
                self.restarts += 1
                self._start(slot)

    def _drain(self) -> int:
        # Every worker not yet reaped, including one that already exited: the stop signal may
        # reach the workers before this loop (Ctrl-C and systemd signal the whole group), and
        # a worker that failed its drain then must still count as failed.
        running = [s for s in self.slots if s.proc is not None]
        reason = (
            signal.Signals(self.stop_signal).name
            if self.stop_signal is not None
            else "a worker cannot start"
        )
        log.info(
            "stopping (%s): draining %d worker(s), grace %.0fs", reason, len(running), self.grace_s
        )
        for slot in running:
            assert slot.proc is not None
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while (
            any(s.proc.poll() is None for s in running if s.proc is not None)
            and time.monotonic() < deadline
            and not self.force
        ):
            time.sleep(self.poll_s)
        killed = []
        failed = []
        for slot in running:
            assert slot.proc is not None
            if slot.proc.poll() is None:
                slot.proc.kill()
                slot.proc.wait()
                killed.append(slot.index)
                log.error(
                    "worker %d (pid %d) did not drain in time: SIGKILLed", slot.index, slot.proc.pid
                )
            elif slot.proc.returncode not in _STOPPED:
                failed.append(slot.index)
                log.error(
                    "worker %d (pid %d) %s while draining",
                    slot.index,
                    slot.proc.pid,
                    describe_exit(slot.proc.returncode),
                )
            slot.last_code = slot.proc.returncode
            slot.proc = None
        if self.fatal is not None:
            return self.fatal
        if killed:
            return RET_KILLED
        if failed:
            return RET_WORKER_FAILED
        log.info("stopped: every worker drained")
        return RET_OK


def entry_module() -> str:
    """The module ``python -m`` ran to start this process; ``consumer`` otherwise."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None) or "consumer"
    name = name.removesuffix(".__main__")
    return name if name == "consumer" or name.startswith("consumer.") else "consumer"


def worker_command(
    app_spec: str, index: int, *, relay: bool, log_json: bool, parent_pid: int
) -> list[str]:
    """The command line of worker ``index``: this interpreter, the hidden ``worker`` command,
    run from the entry module this process was (``consumer``, or a test entry point such as
    ``consumer.testing.faulty`` that installs fault points before the CLI runs)."""
    argv = [sys.executable, "-m", entry_module(), "worker", app_spec, "--id", str(index)]
    argv += ["--relay" if relay else "--no-relay", "--supervisor-pid", str(parent_pid)]
    if log_json:
        argv.append("--log-json")
    return argv


def supervise(
    app_spec: str,
    *,
    workers: int = 1,
    relay: bool = True,
    log_json: bool = False,
    settings: Settings | None = None,
) -> int:
    """Run ``workers`` worker processes of ``app_spec`` until SIGTERM/SIGINT; an exit code."""
    s = settings or load_settings()
    me = os.getpid()
    endpoint = None
    if s.metrics_port:
        # Before any worker starts: they inherit PROMETHEUS_MULTIPROC_DIR (consumer/metrics.py).
        try:
            endpoint = metrics.serve_workers(
                s.metrics_port, s.metrics_dir, stale_s=s.health_stale_s
            )
        except OSError as exc:
            log.error("CONSUMER_METRICS_PORT=%d: cannot serve metrics: %s", s.metrics_port, exc)
            return RET_CONFIG
        except ConfigError as exc:
            log.error("cannot serve metrics: %s", exc)
            return RET_CONFIG
        log.info("metrics for all workers on port %d, path /metrics", endpoint.port)
    sup = Supervisor(
        lambda i: worker_command(app_spec, i, relay=relay, log_json=log_json, parent_pid=me),
        workers,
        grace_s=s.shutdown_grace_s,
        backoff_s=s.restart_backoff_s,
        backoff_max_s=s.restart_backoff_max_s,
    )
    log.info("supervising %d worker(s) of %s (pid %d)", workers, app_spec, me)
    try:
        return sup.run()
    finally:
        if endpoint is not None:
            endpoint.close()
