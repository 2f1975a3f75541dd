"""A worker that fails while draining must not let the supervisor exit 0.

When the stop signal reaches the workers at the same time as the supervisor (Ctrl-C in a
terminal signals the whole foreground process group; systemd's default KillMode=control-group
signals every process of the unit), a worker can fail its drain and exit before the
supervisor's loop notices the signal. ``Supervisor._drain`` must look at every worker not yet
reaped, not only those still running, or that failure is never seen and it reports RET_OK.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consumer.exitcodes import RET_WORKER_FAILED
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

# A worker whose drain fails at once: exit code 1 (RET_ERROR) on SIGTERM.
CHILD = """
import pathlib, signal, sys, time
d = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
(d / f"ready-{sys.argv[2]}").write_text("")
while True:
    time.sleep(0.05)
"""

# poll_s=0.5 only widens the window that exists at the default 0.1 s, so the test is not flaky.
DRIVER = """
import sys
from consumer import logs
from consumer.supervisor import Supervisor
child, d = sys.argv[1:3]
logs.setup()
sup = Supervisor(
    lambda i: [sys.executable, child, d, str(i)],
    2, grace_s=10.0, backoff_s=0.1, backoff_max_s=1.0, poll_s=0.5,
)
sys.exit(sup.run())
"""


def test_a_worker_failing_its_drain_before_the_supervisor_looks_is_not_exit_0(
    tmp_path: Path,
) -> None:
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "driver.py").write_text(DRIVER)
    log_path = tmp_path / "driver.log"
    with open(log_path, "wb") as log:
        # Its own process group, like a service unit or a terminal job.
        proc = subprocess.Popen(
            [
                sys.executable,
                str(tmp_path / "driver.py"),
                str(tmp_path / "child.py"),
                str(tmp_path),
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"ready-{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # the group: supervisor and workers together
        code = proc.wait(30)
        print(log_path.read_text())
        assert code == RET_WORKER_FAILED, f"supervisor exited {code}; both workers exited 1"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
