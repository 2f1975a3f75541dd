"""The supervisor with real processes but stand-in workers (no Kafka, Redis or PostgreSQL).

A driver process runs :class:`consumer.supervisor.Supervisor` over small child scripts whose
behaviour is chosen per test: crash once, exit with RET_IMPORT, ignore SIGTERM. The test only
signals the driver (and, once, a child it started); every process is killed on the way out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from consumer.exitcodes import RET_IMPORT, RET_KILLED, RET_OK
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

CHILD = """
import os, pathlib, signal, sys, time
slot, d, mode = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
starts = d / f"starts-{slot}"
n = len(starts.read_text()) if starts.exists() else 0
starts.write_text("x" * (n + 1))
(d / f"pid-{slot}").write_text(str(os.getpid()))
if mode == "crash_once" and slot == "0" and n == 0:
    sys.exit(42)  # no named code: an ordinary crash
if mode == "fatal" and slot == "1":
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
(d / f"ready-{slot}-{n}").write_text("")
while True:
    time.sleep(0.05)
"""

DRIVER = """
import sys
from consumer import logs
from consumer.supervisor import Supervisor
child, d, mode, n, grace = sys.argv[1:6]
logs.setup()
sup = Supervisor(
    lambda i: [sys.executable, child, str(i), d, mode],
    int(n), grace_s=float(grace), backoff_s=0.1, backoff_max_s=1.0,
)
sys.exit(sup.run())
"""


class Driver:
    def __init__(self, tmp: Path, mode: str, workers: int, grace_s: float) -> None:
        self.dir = tmp
        (tmp / "child.py").write_text(CHILD)
        (tmp / "driver.py").write_text(DRIVER)
        self.log_path = tmp / "driver.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(tmp / "driver.py"),
                    str(tmp / "child.py"),
                    str(tmp),
                    mode,
                    str(workers),
                    str(grace_s),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.children_seen: set[int] = set()

    def log(self) -> str:
        return self.log_path.read_text()

    def child_pid(self, slot: int) -> int:
        pid = int((self.dir / f"pid-{slot}").read_text())
        self.children_seen.add(pid)
        return pid

    def starts(self, slot: int) -> int:
        path = self.dir / f"starts-{slot}"
        return len(path.read_text()) if path.exists() else 0

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        return self.proc.wait(timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.children_seen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def until(check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Callable[..., Driver]]:
    made: list[Driver] = []

    def make(mode: str, workers: int = 2, grace_s: float = 10.0) -> Driver:
        d = Driver(tmp_path, mode, workers, grace_s)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
        print(d.log())


def ready(tmp: Path, slot: int, incarnation: int) -> Callable[[], bool]:
    return lambda: (tmp / f"ready-{slot}-{incarnation}").exists()


def test_a_crashed_worker_is_restarted_and_the_log_says_why(driver, tmp_path):
    d = driver("crash_once")
    until(ready(tmp_path, 0, 1), "slot 0 restarted after its crash")
    until(ready(tmp_path, 1, 0), "slot 1 up")
    assert d.starts(0) == 2 and d.starts(1) == 1
    assert "worker 0 (pid " in d.log() and "exited with code 42 after" in d.log()
    assert "restarting in 0.1s" in d.log()
    victim = d.child_pid(1)
    os.kill(victim, signal.SIGKILL)
    until(ready(tmp_path, 1, 1), "slot 1 restarted after SIGKILL")
    assert f"worker 1 (pid {victim}) killed by SIGKILL" in d.log()
    pids = [d.child_pid(0), d.child_pid(1)]
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit() == RET_OK
    assert all(gone(p) for p in pids)
    assert "stopping (SIGTERM): draining 2 worker(s)" in d.log()
    assert "stopped: every worker drained" in d.log()


def test_sigint_is_forwarded_too(driver, tmp_path):
    d = driver("obedient")
    until(ready(tmp_path, 0, 0), "slot 0 up")
    until(ready(tmp_path, 1, 0), "slot 1 up")
    pids = [d.child_pid(0), d.child_pid(1)]
    d.proc.send_signal(signal.SIGINT)
    assert d.wait_exit() == RET_OK
    assert all(gone(p) for p in pids)


def test_a_worker_that_cannot_import_stops_everything_with_its_code(driver, tmp_path):
    d = driver("fatal")
    assert d.wait_exit() == RET_IMPORT
    assert "exited with code 3 (RET_IMPORT); a restart cannot fix that" in d.log()
    assert d.starts(1) == 1  # not restarted
    assert gone(d.child_pid(0))


def test_workers_that_do_not_drain_are_killed_after_the_grace_period(driver, tmp_path):
    d = driver("stubborn", grace_s=0.5)
    until(ready(tmp_path, 0, 0), "slot 0 up")
    until(ready(tmp_path, 1, 0), "slot 1 up")
    pids = [d.child_pid(0), d.child_pid(1)]
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit() == RET_KILLED
    assert all(gone(p) for p in pids)
    assert "did not drain in time: SIGKILLed" in d.log()


def test_a_second_signal_skips_the_rest_of_the_grace_period(driver, tmp_path):
    d = driver("stubborn", grace_s=600)
    until(ready(tmp_path, 0, 0), "slot 0 up")
    until(ready(tmp_path, 1, 0), "slot 1 up")
    d.proc.send_signal(signal.SIGTERM)
    until(lambda: "draining 2 worker(s)" in d.log(), "draining")
    d.proc.send_signal(signal.SIGTERM)
    assert d.wait_exit() == RET_KILLED  # well within the 600 s grace
