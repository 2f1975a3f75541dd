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
import sys
import time
from pathlib import Path
from typing import IO

APP_SPEC = "handlers.app:app"


def children_of(pid: int) -> list[int]:
    """Live direct children of ``pid`` (Linux ``/proc``), oldest first."""
    found: list[tuple[int, int]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, ..., starttime is #22.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append((int(fields[19]), int(entry)))
    return [p for _, p in sorted(found)]


class Fleet:
    """``workers`` worker processes of ``handlers.app:app`` under the supervisor."""

    def __init__(self, workers: int, env: dict[str, str], log_path: Path) -> None:
        self.workers = workers
        self.env = env
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        self.supervisor: subprocess.Popen[bytes] | None = None
        self.seen: set[int] = set()

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.supervisor = subprocess.Popen(
            [sys.executable, "-m", "consumer", "run", APP_SPEC, "--workers", str(self.workers)],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal reaches the demo, not the workers
        )

    @property
    def alive(self) -> bool:
        return self.supervisor is not None and self.supervisor.poll() is None

    def worker_pids(self) -> list[int]:
        if self.supervisor is None:
            return []
        pids = children_of(self.supervisor.pid)
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
        if sup is not None and sup.poll() is None:
            workers = self.worker_pids()
            sup.send_signal(signal.SIGTERM)
            try:
                sup.wait(timeout_s)
            except subprocess.TimeoutExpired:
                for pid in [*workers, sup.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                sup.wait(5)
            deadline = time.monotonic() + 5
            while any(_alive(p) for p in workers) and time.monotonic() < deadline:
                time.sleep(0.1)
        if self._log is not None:
            self._log.close()
            self._log = None


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
