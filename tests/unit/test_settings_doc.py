"""docs/settings.md is the Settings class, rendered: it cannot drift from the code."""

from __future__ import annotations

import pytest

from consumer.settings import Settings, variable
from scripts import settings_doc

pytestmark = pytest.mark.unit


def test_the_settings_page_is_what_the_class_renders():
    assert settings_doc.PAGE.read_text() == settings_doc.render(), (
        "docs/settings.md is stale: run `python -m scripts.settings_doc`"
    )


def test_every_setting_has_a_row_with_its_default_and_a_description():
    page = settings_doc.PAGE.read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in page.splitlines()[10:] if line}
    assert set(rows) == {variable(f) for f in Settings.model_fields}
    assert [r for r in rows.values() if r.rstrip().endswith("|  |")] == []
    assert "| `10000` |" in rows["CONSUMER_LEASE_MS"]  # the default the code has
    assert "| `application/msgpack` |" in rows["CONSUMER_DEFAULT_CONTENT_TYPE"]
