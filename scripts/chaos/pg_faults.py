"""PostgreSQL faults that lose committed transactions: a restore from an earlier dump.

``postgres_restore``: ``pg_dump`` of the database, a few seconds of traffic (committed
batches: ledger rows, inbox rows, stored positions, outbox rows, downstream effects), then
the database is replaced by the dump while the workers run: restored into a side database,
the live one dropped (``WITH (FORCE)``: the workers' sessions end, they error and reconnect)
and the restored one renamed into its place, as an operator keeps the outage short. Redis
keeps its done markers and leases. What the restore lost is still on Kafka, after the
restored stored positions: it must be read again and applied exactly once, downstream too
(the checker's per-key and downstream verdicts say whether it was). Issue 13, finding 2:
until the done markers are tied to the database's incarnation, they answer the re-read
records as duplicates and the lost tail is applied nowhere.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg

from scripts.chaos.services import Instance

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
DATABASE = "consumer"


async def _run(*argv: str, timeout_s: float = 120) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(argv[0]).name} exit {proc.returncode}: {out.decode()[-500:]}")
    return out.decode()


def _conn_args(inst: Instance) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(inst.ports["pg"]), "-U", "postgres"]


async def _ledger_rows(inst: Instance) -> int:
    conn = await asyncpg.connect(inst.dsn, timeout=10)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM ledger"))
    finally:
        await conn.close()


async def restore(inst: Instance, lag_s: float = 4.0) -> str:
    """Dump, let ``lag_s`` of traffic commit, replace the database with the dump."""
    dump = inst.dir / "restore.dump"
    await _run(str(PG_BIN / "pg_dump"), *_conn_args(inst), "-Fc", "-f", str(dump), DATABASE)
    at_dump = await _ledger_rows(inst)
    await asyncio.sleep(lag_s)
    side = f"{DATABASE}_restored"
    psql = [str(PG_BIN / "psql"), *_conn_args(inst), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    await _run(*psql, "-d", "postgres", "-c", f"DROP DATABASE IF EXISTS {side}")
    await _run(*psql, "-d", "postgres", "-c", f"CREATE DATABASE {side}")
    await _run(str(PG_BIN / "pg_restore"), *_conn_args(inst), "-d", side, str(dump))
    before = await _ledger_rows(inst)
    await _run(
        *psql,
        "-d",
        "postgres",
        "-c",
        f"DROP DATABASE {DATABASE} WITH (FORCE)",
        "-c",
        f"ALTER DATABASE {side} RENAME TO {DATABASE}",
    )
    return (
        f"pg_dump at {at_dump} ledger rows; {lag_s:.0f}s later restored over {before} rows "
        f"({before - at_dump} committed payments lost by PostgreSQL; Redis kept)"
    )
