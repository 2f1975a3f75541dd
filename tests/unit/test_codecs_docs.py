"""docs/codecs.md's example module, run by pytest as a user would run it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.unit import test_harness_docs

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[2] / "docs" / "codecs.md"


def test_the_avro_example_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(# (test_\w+\.py)\n.*?)```", DOC.read_text(), re.S)
    assert [name for _, name in blocks] == ["test_orders_avro.py"]
    monkeypatch.setattr(test_harness_docs, "examples", lambda: {n: c for c, n in blocks})
    test_harness_docs.run_example(tmp_path, "test_orders_avro.py")
