"""Versioned ``.sql`` migrations, applied in order under an advisory lock.

Files are named ``NNNN_description.sql``. The framework's own come first (``dedup`` scope),
then each application folder (scope = folder name). Applying twice is a no-op; two workers
starting at once serialise on the lock.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from consumer.errors import ConfigError

FRAMEWORK_DIR = Path(__file__).resolve().parent.parent / "migrations"
_LOCK_ID = 0x6465647570  # "dedup"
_NAME = re.compile(r"^(\d{4})_[\w-]+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    scope: str
    version: int
    path: Path


def discover(folders: Sequence[tuple[str, Path]]) -> list[Migration]:
    found: list[Migration] = []
    for scope, folder in folders:
        if not folder.is_dir():
            raise ConfigError(f"migrations folder {folder} does not exist")
        for path in sorted(folder.glob("*.sql")):
            m = _NAME.match(path.name)
            if not m:
                raise ConfigError(f"migration {path} is not named NNNN_description.sql")
            found.append(Migration(scope, int(m.group(1)), path))
    return found


async def apply(conn: asyncpg.Connection, app_folders: Sequence[Path] = ()) -> list[str]:
    """Apply pending migrations; returns the names applied."""
    folders = [("dedup", FRAMEWORK_DIR)] + [(p.name, p) for p in app_folders]
    migrations = discover(folders)
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await conn.execute(
            """
            CREATE SCHEMA IF NOT EXISTS dedup;
            CREATE TABLE IF NOT EXISTS dedup.schema_migrations (
                scope text NOT NULL, version int NOT NULL, name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (scope, version))
            """
        )
        done = {
            (r[0], r[1])
            for r in await conn.fetch("SELECT scope, version FROM dedup.schema_migrations")
        }
        for mig in migrations:
            if (mig.scope, mig.version) in done:
                continue
            async with conn.transaction():
                await conn.execute(mig.path.read_text())
                await conn.execute(
                    "INSERT INTO dedup.schema_migrations (scope, version, name) VALUES ($1,$2,$3)",
                    mig.scope,
                    mig.version,
                    mig.path.name,
                )
            applied.append(f"{mig.scope}/{mig.path.name}")
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied


async def migrate_dsn(dsn: str, app_folders: Sequence[Path] = ()) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return await apply(conn, app_folders)
    finally:
        await conn.close()
