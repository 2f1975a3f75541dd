"""PostgreSQL failover: a streaming standby promoted while the workers run.

``postgres_failover_sync`` / ``postgres_failover_async``: a standby is cloned from the current
primary (``pg_basebackup -R``, on the instance's port ``base + 5433 + n``), started and
awaited until it streams. Then

* **sync**: ``synchronous_standby_names = '*'`` on the primary (every commit waits for the
  standby's flush), traffic for a few seconds, the primary stopped in immediate mode, the
  standby promoted: no committed transaction may be missing;
* **async**: the standby is stopped (it lags, as a replica that was restarting or cut off
  does), traffic commits on the primary for a few seconds, the primary is stopped in
  immediate mode, the standby starts again (too late: its primary is gone) and is promoted
  without that tail. The lost tail is still on Kafka after the promoted database's
  stored positions: it must be read again and applied exactly once, downstream included.

Then the campaign's proxy (:mod:`scripts.chaos.pg_proxy`), which every DSN of the run names,
is switched to the promoted standby and cuts its open connections. PostgreSQL runs as the
``postgres`` OS user when the campaign runs as root, like ``scripts/services.sh`` does.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from scripts.chaos.pg_faults import PG_BIN, _run
from scripts.chaos.pg_proxy import PgProxy
from scripts.chaos.services import Instance


def _as_pg(*argv: str) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return list(argv)


@dataclass
class Cluster:
    """The PostgreSQL the proxy points at now: its port and data directory."""

    port: int
    data: Path


@dataclass
class Failovers:
    """The current primary of the run and every standby the failovers started."""

    inst: Instance
    proxy: PgProxy
    primary: Cluster
    started: list[Cluster] = field(default_factory=list)

    def dsn(self, port: int, db: str = "consumer") -> str:
        return f"postgresql://postgres@127.0.0.1:{port}/{db}"

    async def _fetchval(self, port: int, sql: str, db: str = "postgres") -> object:
        conn = await asyncpg.connect(self.dsn(port, db), timeout=10)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    async def _wait(self, port: int, sql: str, what: str, timeout_s: float = 60) -> None:
        for _ in range(int(timeout_s / 0.2)):  # a server-side state: nothing to subscribe to
            try:
                if await self._fetchval(port, sql):
                    return
            except (OSError, asyncpg.PostgresError):
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError(f"{what} not reached in {timeout_s:.0f}s")

    async def _standby(self) -> Cluster:
        n = len(self.started) + 1
        port = self.inst.port_base + 5433 + len(self.started)
        data = self.primary.data.parent / f"standby-{n}"
        if data.exists():
            shutil.rmtree(data)
        await _run(
            *_as_pg(
                str(PG_BIN / "pg_basebackup"),
                *("-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres"),
                *("-D", str(data), "-R", "-X", "stream", "-c", "fast"),
            )
        )
        # postgresql.auto.conf is read last: its port wins over the copied consumer.conf's.
        await _run(*_as_pg("bash", "-c", f"echo 'port = {port}' >> {data}/postgresql.auto.conf"))
        await _run(
            *_as_pg(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", f"{data}.log", "-W", "start")
        )
        standby = Cluster(port, data)
        self.started.append(standby)
        await self._wait(port, "SELECT pg_is_in_recovery()", "standby up")
        await self._wait(
            self.primary.port,
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            "standby streaming",
        )
        return standby

    async def _ledger(self, port: int) -> int:
        return int(str(await self._fetchval(port, "SELECT count(*) FROM ledger", "consumer")))

    async def failover(self, synchronous: bool, traffic_s: float = 4.0) -> str:
        standby = await self._standby()
        if synchronous:
            await self._fetchval(
                self.primary.port, "ALTER SYSTEM SET synchronous_standby_names = '*'"
            )
            await self._fetchval(self.primary.port, "SELECT pg_reload_conf()")
            await self._wait(
                self.primary.port,
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                "synchronous standby",
            )
        else:
            # Stopped, not SIGSTOPped: a frozen WAL receiver still finds the tail waiting in
            # its socket buffer when it resumes (seen: 4 MB of WAL, nothing lost).
            await _run(*_as_pg(str(PG_BIN / "pg_ctl"), "-D", str(standby.data), "-w", "stop"))
        await asyncio.sleep(traffic_s)  # the workers commit meanwhile
        on_primary = await self._ledger(self.primary.port)
        lsn = await self._fetchval(self.primary.port, "SELECT pg_current_wal_lsn()::text")
        await _run(
            *_as_pg(str(PG_BIN / "pg_ctl"), "-D", str(self.primary.data), "-m", "immediate", "stop")
        )
        if not synchronous:  # back, with its primary gone: it has what it had
            await _run(
                *_as_pg(
                    str(PG_BIN / "pg_ctl"), "-D", str(standby.data), "-l", f"{standby.data}.log"
                ),
                "-W",
                "start",
            )
            await self._wait(standby.port, "SELECT pg_is_in_recovery()", "standby up again")
        await _run(*_as_pg(str(PG_BIN / "pg_ctl"), "-D", str(standby.data), "-w", "promote"))
        await self._wait(standby.port, "SELECT NOT pg_is_in_recovery()", "promotion")
        cut = self.proxy.switch(standby.port)
        old, self.primary = self.primary, standby
        on_standby = await self._ledger(standby.port)
        mode = "sync" if synchronous else "async, standby down meanwhile"
        return (
            f"{mode}: primary :{old.port} stopped (immediate) at LSN {lsn} with {on_primary} "
            f"ledger rows; standby :{standby.port} promoted with {on_standby} "
            f"({on_primary - on_standby} committed payments lost); {cut} connections cut"
        )

    async def stop(self) -> None:
        """Stop every standby started (the services script stops the original primary)."""
        for c in self.started:
            if (c.data / "postmaster.pid").exists():
                await _run(
                    *_as_pg(str(PG_BIN / "pg_ctl"), "-D", str(c.data), "-m", "immediate", "stop")
                )
