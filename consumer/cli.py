"""The ``consumer`` command: run, relay, migrate (operator commands live in cli_admin.py)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import typer

from consumer.db.migrate import migrate_dsn
from consumer.errors import ConfigError
from consumer.loader import load_app

cli = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

RET_OK = 0
RET_CONFIG = 2
RET_IMPORT = 3


def _fail(exc: Exception, code: int) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code)


def _setup_logging(json_logs: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


@cli.command()
def migrate(app_spec: str = typer.Argument(..., metavar="MODULE:APP")) -> None:
    """Apply pending migrations (framework's, then the app's) and exit."""
    try:
        app = load_app(app_spec)
        applied = asyncio.run(migrate_dsn(app.settings.postgres_dsn, app.migrations))
    except ConfigError as exc:
        _fail(exc, RET_CONFIG)
    typer.echo(f"applied {len(applied)} migration(s)" + "".join(f"\n  {a}" for a in applied))


@cli.command()
def run(
    app_spec: str = typer.Argument(..., metavar="MODULE:APP"),
    workers: int = typer.Option(1, "--workers", "-w", min=1, max=64),
    relay: bool = typer.Option(True, "--relay/--no-relay", help="run the outbox relay in workers"),
    log_json: bool = typer.Option(False, "--log-json"),
) -> None:
    """Apply migrations, then consume with N worker processes."""
    _setup_logging(log_json)
    try:
        app = load_app(app_spec)
        asyncio.run(migrate_dsn(app.settings.postgres_dsn, app.migrations))
    except ConfigError as exc:
        _fail(exc, RET_CONFIG)
    from consumer.supervisor import supervise

    raise typer.Exit(supervise(app_spec, workers=workers, relay=relay))


@cli.command("worker", hidden=True)
def worker_cmd(
    app_spec: str = typer.Argument(..., metavar="MODULE:APP"),
    worker_id: int = typer.Option(0, "--id"),
    relay: bool = typer.Option(True, "--relay/--no-relay"),
) -> None:
    """Run one worker in this process (what the supervisor starts)."""
    _setup_logging()
    app = load_app(app_spec)
    raise typer.Exit(run_worker(app, worker_id, relay))


def run_worker(app: object, worker_id: int, relay: bool) -> int:
    from consumer.app import App
    from consumer.runtime.worker import Worker

    assert isinstance(app, App)
    settings = app.settings.model_copy(
        update={"relay_enabled": relay and app.settings.relay_enabled}
    )

    async def main() -> None:
        worker = Worker(app, settings, worker_id)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop.set)
        await worker.run()

    asyncio.run(main())
    return RET_OK


@cli.command("relay")
def relay_cmd(app_spec: str = typer.Argument(..., metavar="MODULE:APP")) -> None:
    """Run the outbox relay alone in this process."""
    _setup_logging()
    try:
        app = load_app(app_spec)
    except ConfigError as exc:
        _fail(exc, RET_CONFIG)
    from consumer.outbox.relay import Relay

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Relay(app.settings).run(stop)

    asyncio.run(main())


def main() -> None:
    cli()
