"""The chaos campaign's own Kafka, Redis and PostgreSQL: started, faulted and wiped here.

The campaign kills and restarts these services, so it never uses the shared instance of
``make services``: it drives ``scripts/services.sh`` with its own directory, ports and env
file. Only this instance's pid files are ever signalled (services.sh guarantees that).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "services.sh"
SHARED_KAFKA_LIBS = ROOT / ".services" / "kafka" / "libs"


@dataclass(frozen=True)
class Instance:
    """One isolated set of services, by name; ports are ``base + 9092 / 9093 / 6379 / 5432``."""

    name: str = "chaos"
    port_base: int = 20_000

    @property
    def dir(self) -> Path:
        return ROOT / ".services" / self.name

    @property
    def env_file(self) -> Path:
        return ROOT / ".services" / f"{self.name}.env"

    @property
    def ports(self) -> dict[str, int]:
        b = self.port_base
        return {"kafka": b + 9092, "controller": b + 9093, "redis": b + 6379, "pg": b + 5432}

    def ephemeral_ports(self) -> list[int]:
        """This instance's ports that lie in the kernel's range for outgoing connections.

        Each of those may, at any moment, be the local port of some client connection (or of
        its TIME_WAIT, for 60 s after it closed) anywhere on the machine; the service's next
        bind on it then fails with EADDRINUSE, even with SO_REUSEADDR. The campaign binds
        every port again at each fresh start and restart, so such a base makes runs fail at
        random (the test_chaos flake of issue 13, with the ports 39092/35432 of base 30000).
        """
        try:
            text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
            low, high = (int(x) for x in text.split())
        except (OSError, ValueError):
            return []
        return sorted(p for p in self.ports.values() if low <= p <= high)

    def script_env(self) -> dict[str, str]:
        p = self.ports
        return {
            **os.environ,
            "SERVICES_DIR": str(self.dir),
            "ENV_FILE": str(self.env_file),
            "KAFKA_PORT": str(p["kafka"]),
            "KAFKA_CONTROLLER_PORT": str(p["controller"]),
            "REDIS_PORT": str(p["redis"]),
            "PG_PORT": str(p["pg"]),
            # No SASL_SSL listener: an instance's ports are its own, and an inherited
            # KAFKA_SECURE_PORT (the shared instance's) would collide with that one.
            "KAFKA_SECURE_PORT": "",
        }

    def consumer_env(self) -> dict[str, str]:
        """The CONSUMER_* connection settings of this instance."""
        p = self.ports
        return {
            "CONSUMER_KAFKA_BOOTSTRAP": f"127.0.0.1:{p['kafka']}",
            "CONSUMER_REDIS_URL": f"redis://127.0.0.1:{p['redis']}/0",
            "CONSUMER_POSTGRES_DSN": f"postgresql://postgres@127.0.0.1:{p['pg']}/consumer",
        }

    @property
    def bootstrap(self) -> str:
        return self.consumer_env()["CONSUMER_KAFKA_BOOTSTRAP"]

    @property
    def redis_url(self) -> str:
        return self.consumer_env()["CONSUMER_REDIS_URL"]

    @property
    def dsn(self) -> str:
        return self.consumer_env()["CONSUMER_POSTGRES_DSN"]

    @contextlib.contextmanager
    def lock(self, wait_s: float) -> Iterator[None]:
        """Hold this instance for one campaign: a second campaign on it waits, then fails."""
        # Keyed by the ports and machine-wide, not per checkout: a campaign started from
        # another clone (CI next to a work tree) on the same ports would otherwise start its
        # services in the instant ours are down between runs and make ours fail to start.
        path = Path(tempfile.gettempdir()) / f"dedup-consumer-chaos-{self.port_base}.lock"
        with path.open("w") as fh:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"services instance {self.name!r} is in use by another campaign"
                        ) from None
                    time.sleep(1.0)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ---------------------------------------------------------------- commands

    async def script(self, command: str, timeout_s: float = 180) -> float:
        """Run ``services.sh <command>`` for this instance; seconds taken. Raises on failure."""
        self.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            "bash",
            str(SCRIPT),
            command,
            env=self.script_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
        except TimeoutError:
            proc.kill()
            raise RuntimeError(f"services.sh {command} did not finish in {timeout_s}s") from None
        with (self.dir / "services-commands.log").open("ab") as fh:
            fh.write(f"\n== {time.strftime('%T')} services.sh {command}\n".encode() + out)
        if proc.returncode != 0:
            tail = out.decode(errors="replace").strip().splitlines()[-15:]
            raise RuntimeError(f"services.sh {command} failed:\n" + "\n".join(tail))
        return time.monotonic() - t0

    def _link_kafka_libs(self) -> None:
        # The broker's jars are resolved once for the default instance; share them rather
        # than resolve them again (services.sh only checks the stamp file inside libs/).
        libs = self.dir / "kafka" / "libs"
        if libs.exists() or not SHARED_KAFKA_LIBS.is_dir():
            return
        libs.parent.mkdir(parents=True, exist_ok=True)
        libs.symlink_to(SHARED_KAFKA_LIBS)

    async def fresh(self) -> float:
        """Stop this instance, delete its data, start it empty. Seconds taken."""
        t0 = time.monotonic()
        if self.dir.exists():
            await self.script("clean")
        self._link_kafka_libs()
        await self.script("up")
        return time.monotonic() - t0

    async def down(self) -> None:
        if self.dir.exists():
            await self.script("down")

    async def flushall(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            shutil.which("redis-cli") or "redis-cli",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.ports["redis"]),
            "FLUSHALL",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0 or b"OK" not in out:
            raise RuntimeError(f"FLUSHALL failed: {out.decode(errors='replace')}")
