"""The demo's worker processes: started, watched, one of them SIGKILLed, and stopped.

Workers run under the framework's supervisor (``consumer run --workers N``), which restarts a
crashed worker; the supervisor's children are found through ``/proc`` (their parent pid), so
the supervisor needs no hook for the demo. Output of every process goes to one log file.

This module only ever signals processes it started or their direct children.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from scripts.toolkit import processes

APP_SPEC = "handlers.app:app"


class Fleet:
    """``workers`` worker processes of ``handlers.app:app`` under the supervisor."""

    def __init__(self, workers: int, env: dict[str, str], log_path: Path) -> None:
        self.workers = workers
        self.env = env
        self.log_path = log_path
        self.supervisor: subprocess.Popen[bytes] | None = None
        self.seen: set[int] = set()

    def start(self) -> None:
        # In a session of its own: Ctrl-C in the terminal reaches the demo, not the workers.
        argv = processes.consumer_argv("run", APP_SPEC, "--workers", str(self.workers))
        self.supervisor = processes.spawn(argv, self.env, self.log_path, new_session=True)

    @property
    def alive(self) -> bool:
        return self.supervisor is not None and self.supervisor.poll() is None

    def worker_pids(self) -> list[int]:
        if self.supervisor is None:
            return []
        pids = processes.children(self.supervisor.pid)
        self.seen.update(pids)
        return pids

    def new_pids(self, before: set[int]) -> list[int]:
        return [p for p in self.worker_pids() if p not in before]

    def kill_one(self) -> int | None:
        """SIGKILL the youngest worker (no chance to drain, commit or leave the group)."""
        pids = self.worker_pids()
        if not pids:
            return None
        victim = pids[-1]
        os.kill(victim, signal.SIGKILL)
        return victim

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the supervisor (it drains its workers); SIGKILL what is left after the wait."""
        sup = self.supervisor
        if sup is None or sup.poll() is not None:
            return
        workers = self.worker_pids()
        sup.send_signal(signal.SIGTERM)
        try:
            sup.wait(timeout_s)
        except subprocess.TimeoutExpired:
            processes.kill_tree(sup)
            processes.reap(sup, 5)
        deadline = time.monotonic() + 5
        while any(processes.alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
