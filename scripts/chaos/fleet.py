"""The processes under test: supervisors with their workers, relays, and one-off workers.

The campaign starts every process here, keeps each one's output in its own log file, and is
the only code that signals them: by pid, only pids it started (or the workers of a supervisor
it started, read from /proc). Worker restarts are the supervisor's job (``consumer run``);
the stand-alone relay is restarted here, as a process manager would.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from scripts.toolkit import processes

FAULT_LINE = re.compile(rb"consumer fault point (\w+): exiting")


@dataclass
class Proc:
    """One process started by the campaign (a supervisor, a relay or a single worker)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    restart: bool = False
    popen: subprocess.Popen[bytes] | None = None
    exits: list[int] = field(default_factory=list)
    starts: int = 0
    stopping: bool = False
    reaped: bool = False  # the current popen's exit is recorded in ``exits``

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def children(self) -> list[int]:
        """Pids of this process's children (a supervisor's workers)."""
        if not self.alive():
            return []
        assert self.popen is not None
        return processes.children(self.popen.pid)

    def fault_lines(self) -> list[str]:
        """Fault points that made this process (or its workers) exit, from its log."""
        try:
            return [m.decode() for m in FAULT_LINE.findall(self.log.read_bytes())]
        except OSError:
            return []


def reap_leftovers(pidfile: Path, bootstrap: str) -> list[int]:
    """SIGKILL processes a previous campaign started and left behind (it was SIGKILLed).

    Only pids listed in ``pidfile`` (written by :class:`Fleet`, removed after a clean finish)
    that still run ``python -m consumer`` against this instance's broker (a reused pid is
    someone else's process and is left alone): an orphaned worker of an earlier run, maybe
    of the broken build, must not join the next run's consumer group.
    """
    killed: list[int] = []
    if not pidfile.exists():
        return killed
    mine = f"CONSUMER_KAFKA_BOOTSTRAP={bootstrap}".encode()
    for pid in {int(p) for p in pidfile.read_text().split() if p.isdigit()}:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-m" in cmdline and any(a.startswith(b"consumer") for a in cmdline) and mine in environ:
            processes.signal_pid(pid, signal.SIGCONT)
            if processes.signal_pid(pid, signal.SIGKILL):
                killed.append(pid)
    pidfile.unlink()
    return killed


class Fleet:
    """Every process of one campaign run. Each pid started is appended to ``pidfile``."""

    def __init__(self, logs: Path, env: dict[str, str], pidfile: Path) -> None:
        self.logs = logs
        self.env = env
        self.pidfile = pidfile
        self.procs: dict[str, Proc] = {}
        self._watch: asyncio.Task[None] | None = None
        logs.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- starting

    def _spawn(self, proc: Proc) -> None:
        # In a session of its own: a Ctrl-C at the terminal reaches only the campaign.
        proc.popen = processes.spawn(proc.argv, proc.env, proc.log, header=True, new_session=True)
        proc.starts += 1
        proc.reaped = False
        with self.pidfile.open("a") as fh:
            fh.write(f"{proc.popen.pid}\n")

    def start(self, name: str, args: list[str], *, restart: bool = False, **env: str) -> Proc:
        """Start ``python -m consumer <args>`` as process ``name`` with extra env vars."""
        # The CLI from the test entry point: it installs DEDUP_TEST_FAULTS / _BROKEN.
        argv = processes.consumer_argv(*args, entry="consumer.testing.faulty")
        proc = Proc(name, argv, {**self.env, **env}, self.logs / f"{name}.log", restart)
        self.procs[name] = proc
        self._spawn(proc)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_loop())
        return proc

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            for proc in list(self.procs.values()):
                if proc.reaped or proc.popen is None or (code := proc.popen.poll()) is None:
                    continue
                proc.exits.append(code)
                proc.reaped = True
                if proc.restart and not proc.stopping:
                    await asyncio.sleep(0.3)
                    self._spawn(proc)

    # ---------------------------------------------------------------- signalling

    signal_pid = staticmethod(processes.signal_pid)

    async def wait_exit(self, proc: Proc, timeout_s: float) -> int | None:
        if proc.popen is None:
            return None
        return await processes.wait_exit(proc.popen, timeout_s)

    async def stop(self, name: str, grace_s: float = 40.0) -> int | None:
        """SIGTERM (drain), then SIGKILL after ``grace_s``; the exit code."""
        proc = self.procs.get(name)
        if proc is None or proc.popen is None:
            return None
        proc.stopping = True
        return await processes.stop(proc.popen, grace_s)

    async def stop_all(self, grace_s: float = 40.0) -> dict[str, int | None]:
        names = [n for n, p in self.procs.items() if p.alive()]
        codes = await asyncio.gather(*(self.stop(n, grace_s) for n in names))
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        return dict(zip(names, codes, strict=True))

    def kill_everything(self) -> None:
        """On the way out, whatever happened: SIGKILL all we started that still runs."""
        for proc in self.procs.values():
            proc.stopping = True
            if proc.popen is not None and proc.alive():
                processes.kill_tree(proc.popen)
                processes.reap(proc.popen, 5)
        if not any(p.alive() for p in self.procs.values()):
            self.pidfile.unlink(missing_ok=True)  # nothing left for the next run to reap
