"""``consumer asyncapi``: the app's AsyncAPI 3.0.0 document, to stdout or ``-o FILE``.

``--format json`` or ``yaml``; without it, YAML when ``-o`` ends in ``.yaml``/``.yml``, else
JSON (PyYAML is not a dependency of the package: YAML needs it installed). The servers are
CONSUMER_KAFKA_BOOTSTRAP's, or ``--bootstrap``'s; nothing is connected to. The document is
built by :mod:`consumer.asyncapi`; docs/asyncapi.md says what is in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from consumer import asyncapi as lib
from consumer.cli.common import ADMIN_APP_ARG, fail, load
from consumer.exitcodes import RET_CONFIG, RET_OK

FORMATS = ("json", "yaml")


def asyncapi(
    app_spec: str = ADMIN_APP_ARG,
    fmt: str | None = typer.Option(
        None, "--format", "-f", help="json or yaml (default: by -o's suffix, else json)"
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="write to FILE, not stdout"),
    bootstrap: str | None = typer.Option(
        None, "--bootstrap", help="Kafka servers of the document (default CONSUMER_KAFKA_BOOTSTRAP)"
    ),
    title: str | None = typer.Option(None, "--title", help="info.title (default: the group)"),
    version: str = typer.Option("1.0.0", "--app-version", help="info.version"),
) -> int:
    """Write the app's AsyncAPI 3.0.0 document (channels, operations, schemas, headers)."""
    chosen = fmt or (
        "yaml" if output is not None and output.suffix in (".yaml", ".yml") else "json"
    )
    if chosen not in FORMATS:
        fail(f"--format {chosen!r}: use json or yaml", RET_CONFIG)
    app = load(app_spec, connections=False)
    s = app.settings
    if bootstrap is not None:
        s = s.model_copy(update={"kafka_bootstrap": bootstrap})
    if not s.kafka_bootstrap.strip():
        fail(
            "no Kafka servers for the document: set CONSUMER_KAFKA_BOOTSTRAP or pass --bootstrap",
            RET_CONFIG,
        )
    text = render(lib.document(app, s, title=title, version=version), chosen)
    if output is None:
        typer.echo(text, nl=False)
        return RET_OK
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror or exc}", RET_CONFIG)
    return RET_OK


def render(doc: dict[str, Any], fmt: str) -> str:
    """``doc`` as JSON (indented) or YAML (block style, keys in the document's order)."""
    if fmt == "json":
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    try:
        import yaml
    except ImportError:
        fail("--format yaml needs PyYAML (pip install pyyaml); or use --format json", RET_CONFIG)

    # Through JSON first: no object is shared, so the YAML has no anchors/aliases (the same
    # schema appears under several messages), which some AsyncAPI tools do not read.
    plain = json.loads(json.dumps(doc))
    dumped: str = yaml.safe_dump(
        plain, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100
    )
    return dumped
