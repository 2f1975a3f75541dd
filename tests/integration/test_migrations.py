"""Migrations against real PostgreSQL: tracked by a scope the app owns and by checksum.

Each test gets its own empty database on the shared server. The CLI tests run
``consumer migrate`` in-process, as a user would, on throw-away app modules.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
from pathlib import Path

import asyncpg
import pytest

from consumer import App, ConfigError, MigrationMismatch, exitcodes
from consumer.cli import main, run_worker
from consumer.db import migrate

pytestmark = pytest.mark.integration

FRAMEWORK = Path(migrate.__file__).resolve().parent.parent / "migrations"
# The framework's files as commit f68ba1f shipped them (later ones are added by others).
F68BA1F_FRAMEWORK_FILES = ("0001_init.sql", "0002_meta.sql")


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Throw-away app modules, importable as the loader does (from the cwd)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def write_app(root: Path, module: str, group: str, folder: str, files: dict[str, str]) -> Path:
    """``root/module.py`` holding ``App(group, migrations=[root/folder])``; the folder."""
    mig = root / folder
    mig.mkdir(parents=True)
    for name, sql in files.items():
        (mig / name).write_text(sql)
    (root / f"{module}.py").write_text(
        f"from consumer import App\napp = App({group!r}, migrations=[{str(mig)!r}])\n"
    )
    return mig


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    assert isinstance(exc.value.code, int)
    return exc.value.code, out, err


async def query(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def tables(dsn: str) -> set[str]:
    rows = asyncio.run(query(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
    return {r[0] for r in rows}


# ---------------------------------------------------------------- scopes


def test_two_apps_whose_folders_are_both_named_migrations_each_get_their_tables(
    capsys, app_dir, fresh_dsn, unique
):
    # The example app's folder and a user's are both called migrations/, same file name.
    write_app(app_dir, f"shop_a_{unique}", "shop-a", "a/migrations",
              {"0001_init.sql": "CREATE TABLE shop_a_orders (id int);"})  # fmt: skip
    write_app(app_dir, f"shop_b_{unique}", "shop-b", "b/migrations",
              {"0001_init.sql": "CREATE TABLE shop_b_orders (id int);"})  # fmt: skip
    code_a, _, _ = cli(capsys, "migrate", f"shop_a_{unique}:app")
    code_b, out_b, err_b = cli(capsys, "migrate", f"shop_b_{unique}:app")
    assert (code_a, code_b) == (0, 0), err_b
    assert "applied 1 migration(s)" in out_b, out_b  # f68ba1f: "applied 0"
    assert {"shop_a_orders", "shop_b_orders"} <= tables(fresh_dsn)


def test_an_app_folder_named_like_the_framework_scope_gets_its_tables(
    capsys, app_dir, fresh_dsn, unique
):
    # f68ba1f recorded the framework's files under "dedup": a folder of that name shared them.
    write_app(app_dir, f"dedup_named_{unique}", "g", "dedup",
              {"0001_mine.sql": "CREATE TABLE mine (id int);"})  # fmt: skip
    code, out, err = cli(capsys, "migrate", f"dedup_named_{unique}:app")
    assert code == 0, err
    assert "mine" in tables(fresh_dsn), out


def test_explicit_scopes_are_validated_and_the_framework_scope_is_reserved(tmp_path):
    assert App("g", migrations={"payments": tmp_path}).migrations == {"payments": tmp_path}
    assert App("g", migrations=[tmp_path]).migrations == {"g[0]": tmp_path}
    for bad in ("consumer", "dedup", "a/b", ""):
        with pytest.raises(ConfigError):
            App("g", migrations={bad: tmp_path})


def test_two_files_with_one_version_are_refused(capsys, app_dir, fresh_dsn, unique):
    # f68ba1f applied the first and skipped the second without a word.
    write_app(app_dir, f"dup_{unique}", "g", "m", {
        "0001_a.sql": "CREATE TABLE dup_a (id int);",
        "0001_b.sql": "CREATE TABLE dup_b (id int);",
    })  # fmt: skip
    code, _, err = cli(capsys, "migrate", f"dup_{unique}:app")
    assert code == exitcodes.RET_CONFIG
    assert "share version 1" in err and len(err.strip().splitlines()) == 1
    assert not {"dup_a", "dup_b"} & tables(fresh_dsn)


# ---------------------------------------------------------------- checksums


def test_an_edited_applied_migration_is_refused_by_migrate(capsys, app_dir, fresh_dsn, unique):
    mig = write_app(app_dir, f"edited_{unique}", "g", "m",
                    {"0001_init.sql": "CREATE TABLE edited (id int);"})  # fmt: skip
    assert cli(capsys, "migrate", f"edited_{unique}:app")[0] == 0
    (mig / "0001_init.sql").write_text("CREATE TABLE edited (id int, extra text);")
    (mig / "0002_next.sql").write_text("CREATE TABLE edited_next (id int);")
    code, out, err = cli(capsys, "migrate", f"edited_{unique}:app")
    assert code == exitcodes.RET_MIGRATION, (code, out, err)
    line = err.strip()
    assert line.startswith("error: applied migration changed") and "\n" not in line
    assert "g[0]/0001_init.sql" in line
    assert "edited_next" not in tables(fresh_dsn)  # refused before anything ran


def test_a_checkout_with_crlf_or_a_bom_is_the_same_migration(capsys, app_dir, fresh_dsn, unique):
    """The same file checked out with CRLF line ends (git core.autocrlf on Windows) or saved
    with a UTF-8 BOM by an editor is not an edit: its checksum is of the text, not the bytes,
    or every worker on that checkout would refuse to start."""
    mig = write_app(app_dir, f"eol_{unique}", "g", "m",
                    {"0001_init.sql": "CREATE TABLE eol (id int);\n-- 2\nSELECT 1;\n"})  # fmt: skip
    assert cli(capsys, "migrate", f"eol_{unique}:app")[0] == 0
    f = mig / "0001_init.sql"
    f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes().replace(b"\n", b"\r\n"))
    (mig / "0002_next.sql").write_text("CREATE TABLE eol_next (id int);")
    code, out, err = cli(capsys, "migrate", f"eol_{unique}:app")
    assert code == 0, (code, out, err)
    assert {"eol", "eol_next"} <= tables(fresh_dsn)


def test_a_deleted_applied_migration_is_refused(capsys, app_dir, fresh_dsn, unique):
    mig = write_app(app_dir, f"deleted_{unique}", "g", "m", {
        "0001_init.sql": "CREATE TABLE deleted_1 (id int);",
        "0002_more.sql": "CREATE TABLE deleted_2 (id int);",
    })  # fmt: skip
    assert cli(capsys, "migrate", f"deleted_{unique}:app")[0] == 0
    (mig / "0002_more.sql").unlink()
    code, _, err = cli(capsys, "migrate", f"deleted_{unique}:app")
    assert code == exitcodes.RET_MIGRATION
    assert "0002_more.sql was applied but its file is gone" in err


def test_a_worker_refuses_to_start_on_an_edited_migration(
    settings, app_dir, fresh_dsn, unique, caplog
):
    mig = app_dir / "m"
    mig.mkdir()
    (mig / "0001_init.sql").write_text("CREATE TABLE worker_t (id int);")
    app = App(f"g-{unique}", migrations={"shop": mig})
    app.settings = settings.model_copy(update={"postgres_dsn": fresh_dsn})
    asyncio.run(migrate.migrate_dsn(fresh_dsn, app.migrations))
    (mig / "0001_init.sql").write_text("CREATE TABLE worker_t (id bigint);")
    # Asked to stop at once: f68ba1f starts, stops and returns RET_OK.
    code = run_worker(app, 0, relay=False, early=[signal.SIGTERM])
    assert code == exitcodes.RET_MIGRATION
    assert any("shop/0001_init.sql" in r.getMessage() and not r.exc_info for r in caplog.records)


# ---------------------------------------------------------------- old databases


async def _apply_like_f68ba1f(dsn: str, app_folder: Path, app_files: list[Path]) -> None:
    """What f68ba1f's applier left behind: rows keyed by folder name, no checksum."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            CREATE SCHEMA IF NOT EXISTS dedup;
            CREATE TABLE IF NOT EXISTS dedup.schema_migrations (
                scope text NOT NULL, version int NOT NULL, name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (scope, version))
            """
        )
        done = [("dedup", FRAMEWORK / n) for n in F68BA1F_FRAMEWORK_FILES]
        done += [(app_folder.name, p) for p in app_files]
        for scope, path in done:
            await conn.execute(path.read_text())
            await conn.execute(
                "INSERT INTO dedup.schema_migrations (scope, version, name) VALUES ($1,$2,$3)",
                scope,
                int(path.name[:4]),
                path.name,
            )
    finally:
        await conn.close()


async def test_a_database_migrated_by_f68ba1f_keeps_upgrading(fresh_dsn, tmp_path):
    # The old app, a table that is not idempotent (a second run would fail loudly).
    old = tmp_path / "payments" / "migrations"
    old.mkdir(parents=True)
    (old / "0001_payments.sql").write_text("CREATE TABLE pay (id int); INSERT INTO pay VALUES (1);")
    await _apply_like_f68ba1f(fresh_dsn, old, [old / "0001_payments.sql"])
    # A second app, folder also named migrations/, never applied under f68ba1f's scheme.
    other = tmp_path / "shop" / "migrations"
    other.mkdir(parents=True)
    (other / "0001_shop.sql").write_text("CREATE TABLE shop (id int);")
    (old / "0002_more.sql").write_text("CREATE TABLE pay_more (id int);")

    payments = App("payments", migrations={"payments": old})
    shop = App("shop", migrations=[other])
    applied = await migrate.migrate_dsn(fresh_dsn, payments.migrations)
    applied += await migrate.migrate_dsn(fresh_dsn, shop.migrations)

    later = {p.name for p in FRAMEWORK.glob("*.sql")} - set(F68BA1F_FRAMEWORK_FILES)
    new_framework = [f"consumer/{name}" for name in sorted(later)]
    assert applied == [*new_framework, "payments/0002_more.sql", "shop[0]/0001_shop.sql"]
    assert [r[0] for r in await query(fresh_dsn, "SELECT id FROM pay")] == [1]  # not re-run
    rows = await query(
        fresh_dsn, "SELECT scope, name, checksum FROM dedup.schema_migrations ORDER BY 1, 2"
    )
    assert all(r["scope"] in {"consumer", "payments", "shop[0]"} for r in rows), rows
    for r in rows:
        folder = {"consumer": FRAMEWORK, "payments": old, "shop[0]": other}[r["scope"]]
        assert r["checksum"] == hashlib.sha256((folder / r["name"]).read_bytes()).hexdigest()
    # And from now on an edit of an adopted file is caught.
    (old / "0001_payments.sql").write_text("CREATE TABLE pay (id bigint);")
    with pytest.raises(MigrationMismatch):
        await migrate.migrate_dsn(fresh_dsn, payments.migrations)


# ---------------------------------------------------------------- concurrency


async def test_concurrent_applies_run_each_file_once(fresh_dsn, tmp_path):
    mig = tmp_path / "m"
    mig.mkdir()
    # Not idempotent on purpose: a second run fails, and the row count shows any double.
    (mig / "0001_t.sql").write_text("CREATE TABLE once (n int); INSERT INTO once VALUES (1);")
    (mig / "0002_t.sql").write_text("INSERT INTO once VALUES (2);")
    sets = App("conc", migrations={"conc": mig}).migrations
    results = await asyncio.gather(*(migrate.migrate_dsn(fresh_dsn, sets) for _ in range(6)))
    labels = [label for r in results for label in r if label.startswith("conc/")]
    assert sorted(labels) == ["conc/0001_t.sql", "conc/0002_t.sql"]
    assert [r[0] for r in await query(fresh_dsn, "SELECT n FROM once ORDER BY n")] == [1, 2]
