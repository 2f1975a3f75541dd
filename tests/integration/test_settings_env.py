"""Settings never fall back silently, checked where it mattered: ``consumer migrate`` and a
worker against the real services. (The rules themselves: tests/unit/test_settings.py.)"""

from __future__ import annotations

import asyncio
import os
import signal

import asyncpg
import pytest

from consumer import App, Settings, exitcodes
from consumer.cli import main, run_worker

pytestmark = pytest.mark.integration


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    # As in a fresh `consumer` process: the app reads the environment again (an earlier test
    # in this process may have loaded handlers.app's settings already).
    import handlers.app

    handlers.app.app._settings = None
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out, err = capsys.readouterr()
    assert isinstance(exc.value.code, int)
    return exc.value.code, out, err


async def has_schema(dsn: str, schema: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(
            await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname=$1)", schema
            )
        )
    finally:
        await conn.close()


def test_migrate_without_connection_settings_names_them(capsys, settings, monkeypatch):
    # f68ba1f: no CONSUMER_* variables meant the dev ports, and migrate wrote to whatever
    # PostgreSQL listened there (or failed with RET_CONNECT when none did).
    for name in list(os.environ):
        if name.upper().startswith("CONSUMER_"):
            monkeypatch.delenv(name)
    code, out, err = cli(capsys, "migrate", "handlers.app:app")
    assert code == exitcodes.RET_CONFIG, (code, out, err)
    line = err.strip()
    assert "\n" not in line and line.startswith("error: ")
    for name in ("CONSUMER_KAFKA_BOOTSTRAP", "CONSUMER_REDIS_URL", "CONSUMER_POSTGRES_DSN"):
        assert name in line
    assert "Traceback" not in err


def test_a_misspelt_variable_stops_migrate_before_it_touches_the_database(
    capsys, fresh_dsn, monkeypatch
):
    monkeypatch.setenv("CONSUMER_LEASE_MSS", "5")
    code, out, err = cli(capsys, "migrate", "handlers.app:app")
    assert code == exitcodes.RET_CONFIG, (code, out, err)
    assert err.strip() == (
        "error: unknown setting CONSUMER_LEASE_MSS (did you mean CONSUMER_LEASE_MS?)"
    )
    assert not asyncio.run(has_schema(fresh_dsn, "dedup"))  # f68ba1f migrated it


def test_a_worker_given_settings_without_connections_refuses_to_start(settings, caplog):
    # Settings built in code (not from the environment) are held to the same rule: an empty
    # DSN would let asyncpg connect wherever libpq's defaults point.
    app = App("no-connections", settings=Settings(postgres_dsn=""))
    code = run_worker(app, 0, relay=False, early=[signal.SIGTERM])
    assert code == exitcodes.RET_CONFIG
    refused = [r for r in caplog.records if "refused to start" in r.getMessage()]
    assert refused and "CONSUMER_POSTGRES_DSN" in refused[0].getMessage()
    assert not refused[0].exc_info


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("CONSUMER_POSTGRES_DSN", "notadsn", "is not a PostgreSQL URI"),
        ("CONSUMER_POSTGRES_DSN", "postgresql://u:s3cret@h:port/db", "port of a host"),
        ("CONSUMER_POSTGRES_DSN", "{dsn}?sslmode=bogus", "sslmode"),
        ("CONSUMER_REDIS_URL", "127.0.0.1:6379", "Redis URL must specify"),
    ],
)
@pytest.mark.parametrize("command", ["migrate", "inspect"])
def test_a_malformed_connection_string_is_one_line_and_ret_config(
    capsys, settings, monkeypatch, variable, value, said, command
):
    # Before: asyncpg's ClientConfigurationError / int() ValueError as a 120-line traceback
    # and exit 1, and `consumer run` restarting its worker on it forever.
    monkeypatch.setenv(variable, value.format(dsn=settings.postgres_dsn))
    argv = ["migrate", "handlers.app:app"]
    if command == "inspect":
        argv = ["inspect", "handlers.app:app", "payments.settle", "k"]
    code, out, err = cli(capsys, *argv)
    assert code == exitcodes.RET_CONFIG, (code, out, err)
    line = err.strip()
    assert "\n" not in line and line.startswith("error: ") and said in line, line
    assert "s3cret" not in line and "Traceback" not in err


def test_a_worker_given_a_dsn_asyncpg_refuses_does_not_restart(settings):
    app = App(
        "bad-dsn",
        settings=settings.model_copy(
            update={"postgres_dsn": settings.postgres_dsn + "?sslmode=bogus"}
        ),
    )
    assert run_worker(app, 0, relay=False) == exitcodes.RET_CONFIG  # FATAL: never restarted
