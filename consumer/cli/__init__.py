"""The ``consumer`` command: the typer app, its commands and :func:`main`.

One module a noun, none importing another's commands: ``common`` (fail, load, connect,
console), ``migrate``, ``run`` (run, worker, relay), ``records`` (inspect, evict),
``conflicts``, ``replay``, ``positions`` (reset-positions), ``topics`` and ``asyncapi``.
This package only assembles them. Every failure a person can fix (a bad option, a bad
setting, an app that does not import, a service that does not answer) ends in one
``error: ...`` line and a named exit code from :mod:`consumer.exitcodes`; only unexpected
errors print a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

import typer

try:  # typer >= 0.20 vendors click; older versions depend on it
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import (  # type: ignore[no-redef,assignment,unused-ignore]
        ClickException,
        UsageError,
    )

from consumer.cli import asyncapi, conflicts, migrate, positions, records, replay, run, topics
from consumer.cli.run import run_worker
from consumer.exitcodes import RET_CONFIG, RET_OK

__all__ = ["cli", "main", "run_worker"]

HELP = """Kafka consumers whose handlers take effect exactly once.

Exit codes: 0 ok, 1 unexpected error, 2 bad option or setting, 3 app not importable,
4 service unreachable, 5 workers killed after the grace period, 6 worker failed,
7 no such record, 8 declined, 9 an applied migration changed, 10 not confirmed: --yes
needed without a terminal, 11 busy: a running batch held the row, nothing changed, retry,
12 Kafka refused the login or its certificate, 13 a needed topic is missing,
130 interrupted at a question (see docs/operations.md).
"""

cli = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP, rich_markup_mode=None)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"dedup-consumer {version('dedup-consumer')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            typer.echo("dedup-consumer (not installed)")
        raise typer.Exit(RET_OK)


@cli.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="print the version"
    ),
) -> None:
    """Kafka consumers whose handlers take effect exactly once."""


# In the order ``consumer --help`` has always listed them.
cli.command("migrate")(migrate.migrate)
cli.command("run")(run.run)
cli.command("worker", hidden=True)(run.worker)
cli.command("relay")(run.relay)
cli.command("inspect")(records.inspect)
cli.command("evict")(records.evict)
cli.command("conflicts")(conflicts.conflicts)
cli.command("replay")(replay.replay)
cli.command("reset-positions")(positions.reset_positions)
cli.command("topics")(topics.topics)
cli.command("asyncapi")(asyncapi.asyncapi)


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
