"""Processes the scripts and tests start: spawned with a log, found, signalled, reaped.

Only processes started here, and the direct children of those (a supervisor's workers, read
from Linux ``/proc``), are ever signalled: never a process found by its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def consumer_argv(*args: str, entry: str = "consumer") -> list[str]:
    """The command line of ``python -m consumer <args>`` with this interpreter (``entry``:
    another entry module, e.g. ``consumer.testing.faulty`` to have test faults installed)."""
    return [sys.executable, "-m", entry, *args]


def spawn(
    argv: list[str],
    env: dict[str, str],
    log: Path,
    *,
    header: bool = False,
    new_session: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the repository root, stdout and stderr appended to ``log``.

    ``header`` writes a ``===== start`` line first (a log that holds several starts);
    ``new_session`` keeps a Ctrl-C at the terminal from reaching the child.
    """
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        if header:
            out.write(f"\n===== start {time.strftime('%T')} {' '.join(argv)}\n".encode())
            out.flush()
        return subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )


def _stat(pid: int | str) -> list[str] | None:
    # The fields after the parenthesised command name: state, ppid, ..., starttime (#22).
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def state(pid: int) -> str:
    """The process state letter from /proc (T = stopped, Z = zombie), or ``gone``."""
    fields = _stat(pid)
    return fields[0] if fields else "gone"


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    return state(pid) not in ("Z", "gone")


def children(pid: int) -> list[int]:
    """Live (not zombie) direct children of ``pid``, oldest first.

    Read from every process's parent pid, so children started by any of its threads count.
    """
    found: list[tuple[int, int]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(entry)
        if fields and int(fields[1]) == pid and fields[0] != "Z":
            found.append((int(fields[19]), int(entry)))
    return [p for _, p in sorted(found)]


def signal_pid(pid: int, sig: int) -> bool:
    """Send ``sig`` to ``pid``; False if it is gone."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process this code started and its children (stopped ones too)."""
    if proc.poll() is not None:
        return
    for child in children(proc.pid):
        signal_pid(child, signal.SIGCONT)
        signal_pid(child, signal.SIGKILL)
    proc.kill()


async def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    """The exit code once ``proc`` has exited, or None after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (code := proc.poll()) is None:
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.1)
    return code


async def stop(proc: subprocess.Popen[bytes], grace_s: float) -> int | None:
    """SIGTERM (a drain), then :func:`kill_tree` after ``grace_s``; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    code = await wait_exit(proc, grace_s)
    if code is None:
        kill_tree(proc)
        code = await wait_exit(proc, 10)
    return code


def reap(proc: subprocess.Popen[bytes], timeout_s: float = 10) -> None:
    """Wait for a killed process so that it leaves no zombie behind."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout_s)
