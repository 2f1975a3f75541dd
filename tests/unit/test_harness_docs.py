"""docs/testing.md's example test modules, run as a user would run them: by pytest, as files.

A doc example that no longer passes is a defect like any other.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from consumer import Settings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "testing.md"


def examples() -> dict[str, str]:
    """Code blocks that start with ``# test_<name>.py``, by file name."""
    blocks = re.findall(r"```python\n(# (test_\w+\.py)\n.*?)```", DOC.read_text(), re.S)
    return {name: code for code, name in blocks}


def run_example(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text(examples()[name])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            name,
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "error",
            "-o",
            "asyncio_mode=auto",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\b\d+ passed\b", proc.stdout) and "skipped" not in proc.stdout


def test_the_doc_has_its_examples() -> None:
    assert set(examples()) == {"test_orders.py", "test_orders_batch.py", "test_payments.py"}


def test_db_free_example_passes(tmp_path: Path) -> None:
    run_example(tmp_path, "test_orders.py")


def test_batch_handler_example_passes(tmp_path: Path) -> None:
    run_example(tmp_path, "test_orders_batch.py")


@pytest.mark.integration
def test_payments_example_passes(tmp_path: Path, settings: Settings) -> None:
    run_example(tmp_path, "test_payments.py")
