"""CPU seconds of the services (Kafka, Redis, PostgreSQL) from /proc, and the machine's load.

The services' CPU is read, never acted on: pids come from the pid files ``scripts/services.sh``
writes under ``.services/``. PostgreSQL runs one backend process per connection; their time
is counted while they live (``utime + stime`` of the postmaster's children) and, once they
exit, in the postmaster's ``cutime + cstime``, so a difference of two samples is the CPU the
server spent in between, whoever asked for it. On a shared machine that includes other
clients' queries: the figure is an upper bound for one leg.
"""

from __future__ import annotations

import os
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
PID_FILES = {
    "kafka": "kafka/kafka.pid",
    "redis": "redis/redis.pid",
    "postgres": "pg.pid",
}


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; everything after its ')' is positional.
    return raw[raw.rindex(")") + 2 :].split()


def _cpu_ticks(fields: list[str], with_children: bool) -> int:
    # After the name: state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14.
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def service_pids(services_dir: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, rel in PID_FILES.items():
        try:
            text = (services_dir / rel).read_text().strip()
            out[name] = int("".join(c for c in text if c.isdigit()))
        except (OSError, ValueError):
            continue
    return out


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each service, its reaped children included."""
    children: dict[int, int] = {}
    parents = set(pids.values())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields and int(fields[1]) in parents:
            children[int(fields[1])] = children.get(int(fields[1]), 0) + _cpu_ticks(fields, False)
    out: dict[str, float] = {}
    for name, pid in pids.items():
        fields = _stat(pid)
        if fields is None:
            continue
        out[name] = (_cpu_ticks(fields, True) + children.get(pid, 0)) * TICK_S
    return out


def load() -> float:
    """The one-minute load average (2 cores: above 2 means processes waited for a CPU)."""
    return os.getloadavg()[0]
