"""The worker's status line: ``consumed`` is the sum of the outcomes it lists (issue 16)."""

from __future__ import annotations

import pytest

from consumer.message import Message
from consumer.runtime.outcomes import BatchResult, Handled, Outcome
from consumer.runtime.stats import Stats

pytestmark = pytest.mark.unit

# The status line's word for each outcome (plural where the line has always said so).
WORD = {
    Outcome.APPLIED: "applied",
    Outcome.DUPLICATE: "duplicates",
    Outcome.CONFLICT: "conflicts",
    Outcome.REJECTED: "rejected",
    Outcome.FAILED: "failed",
    Outcome.INVALID: "invalid",
    Outcome.SKIPPED: "skipped",
    Outcome.DEFERRED: "deferred",
}


def _stats() -> Stats:
    """Every outcome a different number of times (1, 2, 3 ...), and one retried batch."""
    stats = Stats()
    offset = 0
    for n, outcome in enumerate(Outcome, start=1):
        handled = []
        for _ in range(n):
            handled.append(Handled(Message("t", 0, offset, b"k", b"v"), outcome))
            offset += 1
        stats.add(BatchResult(handled=handled, retry_offset=offset if n == 1 else None))
    return stats


def test_every_outcome_has_a_word_on_the_status_line():
    assert set(WORD) == set(Outcome)  # a new Outcome must get its field, or the sum breaks


def test_consumed_adds_up_with_the_outcomes_of_the_status_line():
    stats = _stats()
    fields = dict(part.split("=", 1) for part in stats.line(0.0).split())
    listed = {WORD[o]: int(fields[WORD[o]]) for o in Outcome}
    assert listed == {WORD[o]: n for n, o in enumerate(Outcome, start=1)}
    assert int(fields["consumed"]) == sum(listed.values()) == stats.consumed
    assert fields["retries"] == "1"  # a re-read, not an outcome: not in the sum


def test_consumed_adds_up_in_the_json_status_too():
    data = _stats().fields(0.0)
    assert data["consumed"] == sum(int(data[WORD[o]]) for o in Outcome)  # type: ignore[call-overload]
