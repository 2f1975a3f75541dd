"""What every ``consumer`` command shares: failing with one line, loading the app, reaching
the services, printing tables.

Each helper exists once here; the command modules import it and never each other. A
failure a person can fix ends in one ``error: ...`` line on stderr and a named exit code from
:mod:`consumer.exitcodes`.
"""

from __future__ import annotations

import logging
import traceback
from typing import TYPE_CHECKING, NoReturn

import asyncpg
import typer
from rich.console import Console

from consumer.errors import ConfigError
from consumer.exitcodes import RET_BUSY, RET_CONFIG, RET_CONNECT, RET_IMPORT
from consumer.loader import AppImportError, load_app

if TYPE_CHECKING:
    from consumer.app import App
    from consumer.settings import Settings

# The run commands' and the operator commands' help words differ; both are kept as they were.
APP_ARG = typer.Argument(..., metavar="MODULE:APP", help="the App to run, e.g. handlers.app:app")
ADMIN_APP_ARG = typer.Argument(..., metavar="MODULE:APP", help="the App, e.g. handlers.app:app")

# A worker's batch holds the rows it writes (inbox, offsets) until it commits: milliseconds.
# Waiting longer than this means something is stuck, and the operator should know.
LOCK_TIMEOUT = "5s"


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr, then exit with a named code."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def unreachable(service: str, exc: BaseException) -> NoReturn:
    """A service did not answer: one line naming it and the error, RET_CONNECT."""
    fail(f"cannot reach {service}: {type(exc).__name__}: {exc}", RET_CONNECT)


def busy(what: str) -> NoReturn:
    """A running batch held the row past LOCK_TIMEOUT: nothing changed, RET_BUSY."""
    fail(
        f"{what} is busy: a running batch held its row for over {LOCK_TIMEOUT} "
        "(lock timeout); nothing changed, retry",
        RET_BUSY,
    )


def load(app_spec: str, *, connections: bool = True) -> App:
    """Import the app and validate its settings, failing with one line and a named code.

    ``connections=False``: a command that connects to nothing (``asyncapi``) also takes an
    app whose connection settings are not all set."""
    try:
        app = load_app(app_spec)
        # Reads and validates CONSUMER_* now, not in a worker; settings given to App() in
        # code are held to the same rule: no connection setting may be missing.
        if connections:
            app.settings.require_connections()
        elif app.given_settings is None:
            from consumer.settings import load_settings

            app.settings = load_settings(require_connections=False)
    except AppImportError as exc:
        fail(str(exc), RET_IMPORT)
    except ConfigError as exc:
        fail(str(exc), RET_CONFIG)
    except Exception as exc:  # the user's module raised while being imported
        where = traceback.extract_tb(exc.__traceback__)[-1]
        fail(
            f"importing {app_spec.partition(':')[0]!r} raised {type(exc).__name__}: {exc} "
            f"({where.filename}:{where.lineno})",
            RET_IMPORT,
        )
    return app


async def connect(settings: Settings) -> asyncpg.Connection:
    """A connection to the app's PostgreSQL, or one line and RET_CONNECT."""
    try:
        return await asyncpg.connect(settings.postgres_dsn)
    except asyncpg.ClientConfigurationError as exc:  # a DSN option asyncpg refuses
        fail(f"CONSUMER_POSTGRES_DSN: {exc}", RET_CONFIG)
    except (OSError, asyncpg.PostgresError) as exc:
        unreachable("PostgreSQL", exc)


def dsn_host(dsn: str) -> str:
    """Where a DSN points, without its credentials (what follows the last '@')."""
    return dsn.split("://", 1)[-1].rpartition("@")[2]


# Not a terminal (a pipe, a file, a log collector): rich would fold every table to 80
# columns, its default width without one. A table never expands past its own width (none is
# built with expand=True), so this is only a bound: each prints as wide as it needs.
PIPED_WIDTH = 4096


def console(*, highlight: bool = True) -> Console:
    """A console for tables: at a terminal its width; piped, as wide as each table needs, so
    lines stay whole (hashes and keys unbroken, one row a line for grep)."""
    probe = Console(highlight=highlight)
    return probe if probe.is_terminal else Console(width=PIPED_WIDTH, highlight=highlight)


_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
}


def log_level(settings: Settings) -> int:
    """The ``logging`` level CONSUMER_LOG_LEVEL names (what every ``logs.setup`` call gets)."""
    return _LEVELS[settings.log_level]
