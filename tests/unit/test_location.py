"""One written form of a Kafka position, ``topic/partition/offset``, everywhere (issue 16)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from consumer.message import Message, location, parse_location

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
# The other form the project once wrote (`t/0@4`), in code or docs.
OTHER_FORM = re.compile(r"partition\}?@\{?|/\{[^}]*partition[^}]*\}@|\w/\d+@\d+\b")


def test_a_location_is_topic_partition_offset_and_reads_back():
    assert location("pay.requested", 2, 41) == "pay.requested/2/41"
    assert Message("pay.requested", 2, 41, None, None).source == "pay.requested/2/41"
    assert parse_location("pay.requested/2/41") == ("pay.requested", 2, 41)


@pytest.mark.parametrize("text", ["", "t/0", "t/0@4", "/0/4", "t/x/4", "t/0/-1"])
def test_what_is_not_a_location_reads_as_none(text):
    assert parse_location(text) is None


def test_no_code_or_doc_writes_the_other_form():
    files = [*ROOT.joinpath("consumer").rglob("*.py"), *ROOT.joinpath("docs").glob("*.md")]
    files.append(ROOT / "README.md")
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        if path.name != "message.py"  # which says why the other form is not used
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if OTHER_FORM.search(line)
    ]
    assert found == []
