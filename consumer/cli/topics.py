"""``consumer topics``: every topic the app reads and writes, and whether each exists.

``--create`` creates the missing ones the framework may create (dlq, conflicts, declared
publish targets; never sources), ``--check`` exits RET_TOPICS when any is missing (for CI),
``--json`` prints the rows as JSON instead of a table. The work is in :mod:`consumer.topics`.
"""

from __future__ import annotations

import asyncio
import json

import typer
from rich.table import Table

from consumer import topics as lib
from consumer.cli.common import ADMIN_APP_ARG, console, fail, load
from consumer.errors import ConfigError
from consumer.exitcodes import RET_CONNECT, RET_OK, of_error


def topics(
    app_spec: str = ADMIN_APP_ARG,
    create: bool = typer.Option(False, "--create", help="create the missing non-source topics"),
    check: bool = typer.Option(False, "--check", help="exit 13 when a needed topic is missing"),
    as_json: bool = typer.Option(False, "--json", help="print JSON rows instead of a table"),
) -> int:
    """List the topics the app reads and writes (source, dlq, conflicts, publish targets)."""
    app = load(app_spec)
    s = app.settings
    try:
        states = asyncio.run(lib.create(app, s) if create else lib.inspect(app, s))
    except ConfigError as exc:  # KafkaAuthError, TopicsMissing (a create the broker refused)
        fail(str(exc), of_error(exc))
    except Exception as exc:
        from aiokafka.errors import KafkaError

        if not isinstance(exc, KafkaError | OSError):
            raise
        fail(f"cannot reach Kafka at {s.kafka_bootstrap}: {exc or type(exc).__name__}", RET_CONNECT)
    if as_json:
        typer.echo(json.dumps([st.row() for st in states]))
    else:
        table = Table(title=f"topics of {app.group} on {s.kafka_bootstrap} ({len(states)})")
        for column in ("topic", "role", "handler", "exists", "partitions", "created"):
            table.add_column(column, overflow="fold")
        for st in states:
            table.add_row(
                st.need.topic,
                st.need.role,
                st.need.handler,
                "yes" if st.exists else "MISSING",
                "-" if st.partitions is None else str(st.partitions),
                "yes" if st.created else "",
            )
        console().print(table)
    return lib.check_code(states) if check else RET_OK
