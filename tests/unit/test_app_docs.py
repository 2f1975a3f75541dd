"""docs/lifespan.md's and docs/middleware.md's examples, run by pytest as files, as a user
would (the runner of tests/unit/test_harness_docs.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.unit import test_harness_docs

pytestmark = pytest.mark.unit

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _example(doc: str) -> tuple[str, str]:
    [(code, name)] = re.findall(
        r"```python\n(# (test_\w+\.py)\n.*?)```", (DOCS / doc).read_text(), re.S
    )
    return name, code


@pytest.mark.parametrize("doc", ["lifespan.md", "middleware.md"])
def test_the_example_passes(tmp_path: Path, doc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name, code = _example(doc)
    monkeypatch.setattr(test_harness_docs, "examples", lambda: {name: code})
    test_harness_docs.run_example(tmp_path, name)
