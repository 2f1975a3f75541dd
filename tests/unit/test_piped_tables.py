"""Tables piped into a file or a log keep their own width, not rich's 80 columns (issue 16).

Run in a child process whose stdout is a pipe, as ``consumer conflicts ... | tee`` or a bench
run logged by CI would be: every cell stays whole on its row's one line.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit

_PRINT = """
from rich.table import Table
from consumer.cli.common import console
table = Table(title="wide")
for column in ("at (UTC)", "namespace", "key", "payload hash", "stored hash", "source"):
    table.add_column(column, overflow="fold")
table.add_row("2026-01-01 00:00:00", "payments.settle@acme", "k" * 120, "a" * 64, "b" * 64,
              "payments.requested/11/123456789")
console().print(table)
console(highlight=False).print("done")
"""


def test_a_piped_table_is_as_wide_as_its_cells():
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    out = subprocess.run(
        [sys.executable, "-c", _PRINT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    lines = out.splitlines()
    (row,) = [line for line in lines if "payments.settle@acme" in line]
    for cell in ("k" * 120, "a" * 64, "b" * 64, "payments.requested/11/123456789"):
        assert cell in row
    width = max(len(line) for line in lines)
    assert 80 < width < 400  # its own width: neither folded to 80 nor padded to the bound
    assert lines[-1] == "done"
