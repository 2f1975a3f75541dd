"""The orders example's processes: the uvicorn server, the relay, the ledger worker.

Command lines and a readiness wait only; starting, signalling and reaping is
scripts/toolkit/processes.py's.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time

import httpx

from scripts.toolkit.processes import consumer_argv

WEB_APP = "handlers.orders.web:app"
LEDGER_APP = "handlers.orders.ledger:app"


def web_argv(port: int) -> list[str]:
    """uvicorn serving the orders endpoint on 127.0.0.1:``port``."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        WEB_APP,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]


def relay_argv(*, faulty: bool = False) -> list[str]:
    """``consumer relay`` on the ledger app's settings; ``faulty``: with DEDUP_TEST_FAULTS."""
    return consumer_argv(
        "relay", LEDGER_APP, entry="consumer.testing.faulty" if faulty else "consumer"
    )


def worker_argv() -> list[str]:
    """The ledger worker without a relay of its own: the relay is a process of its own here."""
    return consumer_argv("run", LEDGER_APP, "--no-relay")


def free_port(first: int, last: int) -> int:
    """The first port of ``first..last`` nothing listens on (checked by binding it)."""
    for port in range(first, last + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{last}")


async def healthy(base_url: str, timeout_s: float) -> bool:
    """True once ``GET /health`` answers 200, False after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base_url, timeout=2) as client:
        while time.monotonic() < deadline:
            try:
                if (await client.get("/health")).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    return False
