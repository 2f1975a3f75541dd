"""The decorator's types as a user's mypy sees them: sync and async handlers accepted, with
their result types; a handler whose payload type is not the schema refused."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SNIPPET = Path(__file__).resolve().parents[1] / "typing" / "handlers_typed.py"


@pytest.mark.timeout(300)
def test_sync_and_async_handlers_type_check_and_a_wrong_payload_does_not():
    from mypy import api

    out, err, _ = api.run(["--strict", "--no-incremental", "--follow-imports=silent", str(SNIPPET)])
    errors = [line for line in out.splitlines() if ": error:" in line]
    lines = SNIPPET.read_text().splitlines()
    expected = [i + 1 for i, line in enumerate(lines) if "expect-error" in line]
    flagged = sorted({int(e.split(":")[1]) for e in errors})
    assert flagged == expected, out + err
