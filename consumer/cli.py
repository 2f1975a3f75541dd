"""The ``consumer`` command: run, worker, relay, migrate (operator commands: cli_admin.py).

Every failure a person can fix (a bad option, a bad setting, an app that does not import, a
service that does not answer) ends in one ``error: ...`` line and a named exit code from
:mod:`consumer.exitcodes`; only unexpected errors print a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

import typer

try:  # typer >= 0.20 vendors click; older versions depend on it
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import (  # type: ignore[no-redef,assignment,unused-ignore]
        ClickException,
        UsageError,
    )

from consumer import logs
from consumer.errors import ConfigError, MigrationMismatch
from consumer.exitcodes import (
    RET_CONFIG,
    RET_CONNECT,
    RET_ERROR,
    RET_IMPORT,
    RET_MIGRATION,
    RET_OK,
)
from consumer.loader import AppImportError, load_app

if TYPE_CHECKING:
    from consumer.app import App

HELP = """Kafka consumers whose handlers take effect exactly once.

Exit codes: 0 ok, 1 unexpected error, 2 bad option or setting, 3 app not importable,
4 service unreachable, 5 workers killed after the grace period, 6 worker failed,
7 no such record, 8 declined, 9 an applied migration changed, 10 not confirmed: --yes
needed without a terminal, 11 busy: a running batch held the row, nothing changed, retry
(see docs/operations.md).
"""

cli = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP, rich_markup_mode=None)
log = logging.getLogger("consumer.cli")

APP_ARG = typer.Argument(..., metavar="MODULE:APP", help="the App to run, e.g. handlers.app:app")


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr, then exit with a named code."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load(app_spec: str) -> App:
    """Import the app and validate its settings, failing with one line and a named code."""
    try:
        app = load_app(app_spec)
        # Reads and validates CONSUMER_* now, not in a worker; settings given to App() in
        # code are held to the same rule: no connection setting may be missing.
        app.settings.require_connections()
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


def _migrate(app: App) -> list[str]:
    import asyncpg

    from consumer.db.migrate import migrate_dsn

    try:
        return asyncio.run(migrate_dsn(app.settings.postgres_dsn, app.migrations))
    except MigrationMismatch as exc:
        fail(str(exc), RET_MIGRATION)
    except ConfigError as exc:
        fail(str(exc), RET_CONFIG)
    except (
        OSError,
        asyncpg.InvalidAuthorizationSpecificationError,
        asyncpg.InvalidCatalogNameError,
        asyncpg.CannotConnectNowError,
    ) as exc:
        # Refused, unreachable, unknown host (OSError), bad role or database, server starting.
        host = _dsn_host(app.settings.postgres_dsn)
        fail(f"cannot reach PostgreSQL at {host}: {type(exc).__name__}: {exc}", RET_CONNECT)


def _dsn_host(dsn: str) -> str:
    # Never echo credentials: keep what follows the last '@'.
    return dsn.split("://", 1)[-1].rpartition("@")[2]


@cli.command()
def migrate(app_spec: str = APP_ARG) -> None:
    """Apply pending migrations (the framework's, then the app's) and exit."""
    logs.setup()
    applied = _migrate(load(app_spec))
    typer.echo(f"applied {len(applied)} migration(s)" + "".join(f"\n  {a}" for a in applied))


@cli.command()
def run(
    app_spec: str = APP_ARG,
    workers: int = typer.Option(1, "--workers", "-w", min=1, max=64, help="worker processes"),
    relay: bool = typer.Option(True, "--relay/--no-relay", help="run the outbox relay in workers"),
    log_json: bool = typer.Option(
        False, "--log-json", help="log JSON lines (or CONSUMER_LOG_JSON)"
    ),
) -> None:
    """Apply migrations, then consume with N supervised worker processes until SIGTERM."""
    app = load(app_spec)
    json_lines = log_json or app.settings.log_json
    logs.setup(json_lines)
    _migrate(app)
    from consumer.supervisor import supervise

    code = supervise(
        app_spec, workers=workers, relay=relay, log_json=json_lines, settings=app.settings
    )
    raise typer.Exit(code)


@cli.command("worker", hidden=True)
def worker_cmd(
    app_spec: str = APP_ARG,
    worker_id: int = typer.Option(0, "--id", min=0),
    relay: bool = typer.Option(True, "--relay/--no-relay"),
    log_json: bool = typer.Option(False, "--log-json"),
    supervisor_pid: int = typer.Option(0, "--supervisor-pid", help="stop when this pid is gone"),
) -> None:
    """Run one worker in this process (what ``run`` starts N of)."""
    # A stop requested while still importing is kept and honoured once the loop runs.
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: early.append(signum))
    app = load(app_spec)
    logs.setup(log_json or app.settings.log_json, worker=worker_id)
    raise typer.Exit(run_worker(app, worker_id, relay, supervisor_pid, early))


def run_worker(
    app: App, worker_id: int, relay: bool, supervisor_pid: int = 0, early: Sequence[int] = ()
) -> int:
    """Run a Worker until SIGTERM/SIGINT (or its supervisor disappears), drained; an exit code."""
    from consumer.runtime.worker import Worker

    settings = app.settings.model_copy(
        update={"relay_enabled": relay and app.settings.relay_enabled}
    )

    async def main() -> None:
        from consumer.telemetry import standard_observers

        observer = standard_observers(settings.hash_keys_in_logs)
        worker = Worker(app, settings, worker_id, observer=observer)
        loop = asyncio.get_running_loop()

        def stop(reason: str) -> None:
            if not worker.stop.is_set():
                log.info(
                    "worker %d stopping (%s): finishing the batch in flight", worker_id, reason
                )
                worker.stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop, sig.name)
        if early:
            stop(signal.Signals(early[0]).name)
        watch = asyncio.create_task(_watch_parent(supervisor_pid, stop))
        try:
            await worker.run()
        finally:
            watch.cancel()
        log.info("worker %d stopped: batch finished, leases released, left the group", worker_id)

    try:
        asyncio.run(main())
    except MigrationMismatch as exc:  # one line: a traceback would not help fixing it
        log.error("worker %d refused to start: %s", worker_id, exc)
        return RET_MIGRATION
    except ConfigError as exc:
        log.error("worker %d refused to start: %s", worker_id, exc)
        return RET_CONFIG
    except Exception:
        log.exception("worker %d failed", worker_id)
        return RET_ERROR
    return RET_OK


async def _watch_parent(supervisor_pid: int, stop: Callable[[str], None]) -> None:
    # A supervisor killed with SIGKILL cannot forward anything: its orphans notice the
    # re-parenting and drain by themselves rather than run on unsupervised.
    if not supervisor_pid:
        return
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != supervisor_pid:
            stop("supervisor gone")
            return


@cli.command("relay")
def relay_cmd(
    app_spec: str = APP_ARG,
    log_json: bool = typer.Option(False, "--log-json", help="log JSON lines"),
) -> None:
    """Run the outbox relay alone in this process, until SIGTERM."""
    app = load(app_spec)
    logs.setup(log_json or app.settings.log_json)
    from consumer import tracing
    from consumer.metrics import MetricsObserver
    from consumer.outbox.relay import Relay

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        relay = Relay(app.settings, observers=MetricsObserver(), publish_span=tracing.publishing)
        await relay.run(stop)

    endpoint = None
    if app.settings.metrics_port:  # its own endpoint: this process is nobody's worker
        from consumer import metrics

        try:
            endpoint = metrics.Server(app.settings.metrics_port)
        except OSError as exc:
            fail(f"CONSUMER_METRICS_PORT={app.settings.metrics_port}: {exc}", RET_CONFIG)
    try:
        asyncio.run(main())
    finally:
        if endpoint is not None:
            endpoint.close()


def _register_admin() -> None:
    from consumer import cli_admin

    cli_admin.register(cli)


_register_admin()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point: click's usage errors become one line and RET_CONFIG."""
    try:
        rv = cli(args=list(argv) if argv is not None else None, standalone_mode=False)
    except UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `consumer`: the help, no "error"
            typer.echo(exc.format_message())
            sys.exit(RET_CONFIG)
        hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx is not None else ""
        typer.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(RET_CONFIG)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except ClickException as exc:
        typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else RET_OK)
