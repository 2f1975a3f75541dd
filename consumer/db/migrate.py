"""Versioned ``.sql`` migrations, applied in order under an advisory lock, checked by checksum.

Files are named ``NNNN_description.sql``. Each folder is a *migration set* with a scope the
app owns: the framework's own set is ``consumer``; an app's sets are named by
``App(migrations={"payments": "handlers/migrations"})`` or, for a plain list of folders, by
the App's group and the folder's position (``payments[0]``). Never by the folder's name: two
apps whose folders are both called ``migrations/`` would otherwise share one history, and the
second one's tables would never be created.

``dedup.schema_migrations`` keeps one row per applied file: scope, version, file name and the
SHA-256 of its bytes. A file applied once and edited (or deleted) since makes :func:`apply`
and :func:`verify` raise :class:`MigrationMismatch` before anything runs: the folder no longer
describes the database, and silently ignoring the edit is how a column goes missing in
production. Applying twice is a no-op; two workers starting at once serialise on the lock.

Databases migrated before checksums (commit f68ba1f) have rows keyed by the folder's name
(``dedup`` for the framework) and no checksum. A set adopts such a row when it has no row of
its own for that version and the legacy row names the same file: the row moves to the set's
scope and takes the file's current checksum. Once adopted, another app whose folder has the
same name no longer sees it, so that app's files are applied as they should have been.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from consumer.errors import ConfigError, MigrationMismatch

FRAMEWORK_DIR = Path(__file__).resolve().parent.parent / "migrations"
FRAMEWORK_SCOPE = "consumer"
# What f68ba1f recorded the framework's files under; reserved so no app set can claim them.
_LEGACY_FRAMEWORK_SCOPE = "dedup"
RESERVED_SCOPES = frozenset({FRAMEWORK_SCOPE, _LEGACY_FRAMEWORK_SCOPE})
_LOCK_ID = 0x6465647570  # "dedup"
_NAME = re.compile(r"^(\d{4})_[\w-]+\.sql$")
_SCOPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Migration:
    """One file of a set: where it is, its version and the SHA-256 of its bytes."""

    scope: str
    version: int
    path: Path
    checksum: str
    legacy_scope: str  # the scope f68ba1f would have recorded it under

    @property
    def label(self) -> str:
        return f"{self.scope}/{self.path.name}"


@dataclass
class Plan:
    """What :func:`apply` would do: files to run, legacy rows to adopt, and mismatches."""

    pending: list[Migration] = field(default_factory=list)
    adopt: list[Migration] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_scope(scope: str) -> str:
    """An app's migration scope: letters, digits, '.', '-', '_'; not the framework's."""
    if not _SCOPE.match(scope):
        raise ConfigError(f"migration scope {scope!r}: use letters, digits, '.', '-' or '_'")
    if scope in RESERVED_SCOPES:
        raise ConfigError(f"migration scope {scope!r} is the framework's own; pick another name")
    return scope


def _text(path: Path) -> str:
    """A migration's SQL as text: without a UTF-8 BOM and with LF line ends, so that one file
    checked out with CRLF (git core.autocrlf) or saved with a BOM is the same migration (same
    checksum; a BOM sent to PostgreSQL is a syntax error). For an LF file without a BOM the
    checksum is that of its bytes, as before."""
    return path.read_bytes().decode("utf-8-sig").replace("\r\n", "\n")


def discover(sets: Mapping[str, Path]) -> list[Migration]:
    """The framework's files, then each app set's, in version order per set."""
    found: list[Migration] = []
    for scope in sets:
        if not scope or scope in RESERVED_SCOPES:  # App() checks names; callers may not
            raise ConfigError(f"migration scope {scope!r} is empty or the framework's own")
    everything = [(FRAMEWORK_SCOPE, FRAMEWORK_DIR, _LEGACY_FRAMEWORK_SCOPE)] + [
        (scope, Path(folder), Path(folder).name) for scope, folder in sets.items()
    ]
    for scope, folder, legacy in everything:
        if not folder.is_dir():
            raise ConfigError(f"migrations folder {folder} does not exist")
        seen: dict[int, Path] = {}
        for path in sorted(folder.glob("*.sql")):
            m = _NAME.match(path.name)
            if not m:
                raise ConfigError(f"migration {path} is not named NNNN_description.sql")
            version = int(m.group(1))
            if version in seen:
                # Two files, one version: only one of them could ever be recorded as applied.
                raise ConfigError(f"migrations {seen[version]} and {path} share version {version}")
            seen[version] = path
            digest = hashlib.sha256(_text(path).encode()).hexdigest()
            found.append(Migration(scope, version, path, digest, legacy))
    return found


async def _ensure_table(conn: asyncpg.Connection) -> None:
    await conn.execute(
        """
        CREATE SCHEMA IF NOT EXISTS dedup;
        CREATE TABLE IF NOT EXISTS dedup.schema_migrations (
            scope text NOT NULL, version int NOT NULL, name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (scope, version));
        -- NULL: a row written before checksums (f68ba1f), adopted on the next apply.
        ALTER TABLE dedup.schema_migrations ADD COLUMN IF NOT EXISTS checksum text;
        """
    )


async def _plan(conn: asyncpg.Connection, migrations: list[Migration]) -> Plan:
    exists = await conn.fetchval("SELECT to_regclass('dedup.schema_migrations') IS NOT NULL")
    rows: dict[tuple[str, int], tuple[str, str | None]] = {}
    if exists:
        has_checksum = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema ="
            " 'dedup' AND table_name = 'schema_migrations' AND column_name = 'checksum')"
        )
        column = "checksum" if has_checksum else "NULL::text"
        for r in await conn.fetch(
            f"SELECT scope, version, name, {column} FROM dedup.schema_migrations"
        ):
            rows[(r[0], r[1])] = (r[2], r[3])
    plan = Plan()
    claimed: set[tuple[str, int]] = set()
    for mig in migrations:
        own = rows.get((mig.scope, mig.version))
        if own is not None and own[1] is not None:
            if own[1] != mig.checksum:
                plan.problems.append(
                    f"{mig.label} was applied with checksum {own[1][:12]} (as {own[0]}) and "
                    f"has changed since (now {mig.checksum[:12]}); put the change in a new file"
                )
            continue
        legacy_key = (mig.legacy_scope, mig.version)
        legacy = rows.get(legacy_key)
        if (
            legacy is not None
            and legacy[1] is None
            and legacy[0] == mig.path.name
            and legacy_key not in claimed
        ):
            claimed.add(legacy_key)
            plan.adopt.append(mig)
        elif own is not None:
            # A pre-checksum row under this very scope naming another file: applying would
            # collide with it, and guessing which file it stood for could skip one.
            plan.problems.append(
                f"{mig.label}: version {mig.version} of {mig.scope!r} is recorded (before "
                f"checksums) as {own[0]}; rename the scope or fix dedup.schema_migrations"
            )
        else:
            plan.pending.append(mig)
    known = {(m.scope, m.version) for m in migrations}
    owned = {m.scope for m in migrations}
    for (scope, version), (name, checksum) in sorted(rows.items()):
        if scope in owned and checksum is not None and (scope, version) not in known:
            plan.problems.append(f"{scope}/{name} was applied but its file is gone")
    return plan


def _refuse(plan: Plan) -> None:
    if plan.problems:
        more = f" (and {len(plan.problems) - 1} more)" if len(plan.problems) > 1 else ""
        raise MigrationMismatch(f"applied migration changed: {plan.problems[0]}{more}")


async def apply(conn: asyncpg.Connection, sets: Mapping[str, Path] | None = None) -> list[str]:
    """Apply pending migrations of the framework and ``sets`` (scope -> folder).

    Returns the labels applied (``scope/file``). Raises :class:`MigrationMismatch`, applying
    nothing, when an applied file changed or disappeared.
    """
    migrations = discover(sets or {})
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
    try:
        await _ensure_table(conn)
        plan = await _plan(conn, migrations)
        _refuse(plan)
        async with conn.transaction():
            for mig in plan.adopt:
                await conn.execute(
                    "UPDATE dedup.schema_migrations SET scope = $1, checksum = $2"
                    " WHERE scope = $3 AND version = $4",
                    mig.scope,
                    mig.checksum,
                    mig.legacy_scope,
                    mig.version,
                )
                log.info("migration %s: adopted its row from before checksums", mig.label)
        for mig in plan.pending:
            async with conn.transaction():
                await conn.execute(_text(mig.path))
                await conn.execute(
                    "INSERT INTO dedup.schema_migrations (scope, version, name, checksum)"
                    " VALUES ($1, $2, $3, $4)",
                    mig.scope,
                    mig.version,
                    mig.path.name,
                    mig.checksum,
                )
            applied.append(mig.label)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied


async def verify(conn: asyncpg.Connection, sets: Mapping[str, Path] | None = None) -> list[str]:
    """Check without changing anything (a worker at start): the labels still pending.

    Raises :class:`MigrationMismatch` when an applied file changed or disappeared.
    """
    plan = await _plan(conn, discover(sets or {}))
    _refuse(plan)
    return [m.label for m in plan.pending]


async def migrate_dsn(dsn: str, sets: Mapping[str, Path] | None = None) -> list[str]:
    """Connect to ``dsn``, :func:`apply`, disconnect."""
    if not dsn:
        raise ConfigError("CONSUMER_POSTGRES_DSN is not set")
    conn = await asyncpg.connect(dsn)
    try:
        return await apply(conn, sets)
    finally:
        await conn.close()
