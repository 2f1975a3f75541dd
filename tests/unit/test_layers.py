"""The import graph of ``consumer/``: no cycle, and no lower layer importing an upper one.

The layers (docs/design.md, "Layers"), bottom to top: the shared base (types, observers,
probe, propagation, constants, errors, message ...); the stores ``db/``, ``dedup/`` and
``outbox/``; ``runtime/``; the observers (metrics, logs, tracing); cli and supervisor. Every
import counts, including one inside a function and one under ``TYPE_CHECKING``: the source is
read with ``ast``, nothing is imported.

Cases that still fail because of files being rewritten elsewhere are strict expected
failures: when the file is fixed the case passes, the run fails, and the mark is removed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "consumer"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(source: str, known: Iterable[str]) -> set[str]:
    """The ``consumer`` modules that ``source`` imports, wherever the import statement is.

    ``from consumer.outbox import store`` names the module ``consumer.outbox.store`` when it
    is one, else the package; ``from consumer.x import Name`` names ``consumer.x``. Relative
    imports are not used in this package (and would be refused by ruff's TID252).
    """
    names = set(known)
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in names else node.module)
    return {m for m in found if m in names}


GRAPH = {m: imports_of(p.read_text(), MODULES) - {m} for m, p in MODULES.items()}


def _in(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


STORES = ("consumer.db", "consumer.dedup", "consumer.outbox")
RUNTIME = ("consumer.runtime",)
OBSERVING = ("consumer.metrics", "consumer.logs", "consumer.tracing")
TOP = (
    "consumer.cli",
    "consumer.cli_admin",
    "consumer.supervisor",
    "consumer.__main__",
    "consumer.testing.faulty",  # an entry point: the CLI with test faults installed
)
# Imported by every layer, so they import (at most) the base themselves.
SHARED = (
    "consumer.types",
    "consumer.observers",
    "consumer.probe",
    "consumer.propagation",
    "consumer.codecs",  # the codec registry: decoding (dedup/), publish (context), replies
)
# Being replaced by consumer/probe.py: a hook passed in, not a module reached for.
FAULTS = ("consumer.faults",)

# What each layer must never import.
FORBIDDEN = {
    "stores": (
        STORES,
        (*RUNTIME, *OBSERVING, *TOP, *FAULTS, "consumer.app", "consumer.testing"),
    ),
    # runtime/ opens the handling span itself (tracing is inert until a provider is set), so
    # it may import tracing; metrics and logs only observe it.
    "runtime": (RUNTIME, ("consumer.metrics", "consumer.logs", *TOP, *FAULTS, "consumer.testing")),
    "shared": (SHARED, (*STORES, *RUNTIME, *OBSERVING, *TOP, *FAULTS, "consumer.app")),
}

KNOWN = {
    ("shared", "consumer.observers"): "observers.py names BatchResult and Stats of runtime/ "
    "(type-only) in Tick; moving those records below runtime/ is left for later",
}


def _cases() -> list[object]:
    cases: list[object] = []
    for layer, (members, _) in FORBIDDEN.items():
        for module in sorted(m for m in MODULES if _in(m, *members)):
            reason = KNOWN.get((layer, module))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(pytest.param(layer, module, marks=marks, id=f"{layer}:{module}"))
    return cases


@pytest.mark.parametrize(("layer", "module"), _cases())
def test_no_layer_imports_one_above_it(layer: str, module: str) -> None:
    _, forbidden = FORBIDDEN[layer]
    wrong = sorted(m for m in GRAPH[module] if _in(m, *forbidden))
    assert not wrong, f"{module} ({layer}) imports {wrong}"


def test_nothing_below_the_top_imports_cli_or_supervisor() -> None:
    wrong = {
        m: sorted(d for d in deps if _in(d, *TOP))
        for m, deps in GRAPH.items()
        if not _in(m, *TOP) and any(_in(d, *TOP) for d in deps)
    }
    assert not wrong


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    assert _cycles(GRAPH) == []


def test_no_cycle_outside_the_cli() -> None:
    # Until the cli package lands: everything else is acyclic already, and must stay so.
    rest = {m: {d for d in deps if not _in(d, *TOP)} for m, deps in GRAPH.items()}
    assert _cycles(rest) == []


# ---------------------------------------------------------------- the checker itself


def test_imports_are_found_wherever_they_are() -> None:
    source = """
from typing import TYPE_CHECKING
import consumer.keys
from consumer.outbox import store, NOT_A_MODULE
if TYPE_CHECKING:
    from consumer.app import App
def later():
    from consumer import tracing
    import os
"""
    known = ["consumer", "consumer.keys", "consumer.outbox", "consumer.outbox.store"]
    known += ["consumer.app", "consumer.tracing"]
    assert imports_of(source, known) == {
        "consumer.keys",
        "consumer.outbox",  # NOT_A_MODULE: a name in the package
        "consumer.outbox.store",
        "consumer.app",
        "consumer.tracing",
    }


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_the_graph_is_the_packages() -> None:
    # A sample of edges that exist: an empty or mis-resolved graph would pass every rule.
    assert "consumer.outbox.sending" in GRAPH["consumer.outbox.relay"]
    assert "consumer.db.offsets" in GRAPH["consumer.db.tx"]
    assert "consumer.propagation" in GRAPH["consumer.outbox.envelopes"]
    assert len(MODULES) > 50
