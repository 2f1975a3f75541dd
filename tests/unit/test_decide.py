"""``decide`` alone, without services: the outcome table of docs/handlers.md row by row.

Each test is one row of "What happens to a message" (plus the two rows the table leaves to
docs/design.md: a record left ``pending`` behind the guard, and one made by a newer release).
The transaction (runtime/transaction.py) only carries out what these return.
"""

from __future__ import annotations

from pydantic import BaseModel

from consumer.dedup.hashing import HASH_VERSION
from consumer.dedup.identity import Identity
from consumer.runtime.decide import Decision, Known, View, decide, wait_reason

NS = "g.pay"


class P(BaseModel):
    n: int


def ident(key: str = "k1", digest: str = "h-same") -> Identity:
    return Identity(NS, key, digest, P(n=1))


def known(status: str, digest: str = "h-same", version: int = HASH_VERSION) -> Known:
    return Known(status, digest, {"ok": 1}, None, True, version)


def test_nothing_recorded_and_claimed_here_runs():
    assert decide(ident(), View(claimed={(NS, "k1")})) is Decision.RUN


def test_done_with_the_same_hash_is_a_duplicate():
    view = View(known={(NS, "k1"): known("done")})
    assert decide(ident(), view) is Decision.DUPLICATE


def test_rejected_with_the_same_hash_is_a_duplicate_not_a_retry():
    view = View(known={(NS, "k1"): known("rejected")})
    assert decide(ident(), view) is Decision.DUPLICATE


def test_done_or_rejected_with_another_hash_is_a_conflict():
    for status in ("done", "rejected"):
        view = View(known={(NS, "k1"): known(status, "h-other")})
        assert decide(ident(), view) is Decision.CONFLICT


def test_a_key_another_worker_holds_waits():
    view = View(busy={(NS, "k1")})
    assert decide(ident(), view) is Decision.WAIT
    assert wait_reason((NS, "k1"), view) == "lease held by another worker"


def test_a_key_held_elsewhere_whose_record_committed_is_decided_by_the_record():
    view = View(busy={(NS, "k1")}, known={(NS, "k1"): known("done")})
    assert decide(ident(), view) is Decision.DUPLICATE


def test_an_invalid_message_never_reaches_a_handler():
    assert decide(None, View(claimed={(NS, "k1")})) is Decision.INVALID


def test_copies_of_a_key_whose_run_failed_share_its_dead_letter():
    view = View(claimed={(NS, "k1")}, failed={(NS, "k1"): ("failed", "attempts_exhausted (5)")})
    assert decide(ident(), view) is Decision.FAILED_COPY
    assert decide(ident(digest="h-other"), view) is Decision.FAILED_COPY


def test_a_second_copy_in_the_batch_after_a_run_is_a_duplicate_not_a_second_run():
    i = (NS, "k1")
    view = View(claimed={i}, processed={i}, known={i: known("done")})
    assert decide(ident(), view) is Decision.DUPLICATE
    assert decide(ident(digest="h-other"), view) is Decision.CONFLICT


def test_a_claimed_key_already_processed_without_a_record_never_runs_twice():
    i = (NS, "k1")
    assert decide(ident(), View(claimed={i}, processed={i})) is Decision.WAIT


def test_neither_claimed_nor_recorded_waits_the_row_changed_under_the_batch():
    view = View()
    assert decide(ident(), view) is Decision.WAIT
    assert wait_reason((NS, "k1"), view) == "inbox record changed under the batch"


def test_a_pending_record_visible_outside_its_transaction_halts():
    view = View(known={(NS, "k1"): known("pending")})
    assert decide(ident(), view) is Decision.HALT
    # Before a failed copy: the partition stops for an operator whatever else is known.
    view.failed[(NS, "k1")] = ("failed", "x")
    assert decide(ident(), view) is Decision.HALT


def test_a_record_of_an_unknown_canonical_form_version_waits_never_decides():
    view = View(known={(NS, "k1"): known("done", version=HASH_VERSION + 7)})
    assert decide(ident(), view) is Decision.WAIT
    assert "unknown canonical-form version" in wait_reason((NS, "k1"), view)
    # ...even a pending one: it is not comparable, so it is not this release's to judge.
    view = View(known={(NS, "k1"): known("pending", version=HASH_VERSION + 7)})
    assert decide(ident(), view) is Decision.WAIT


def test_a_record_of_an_older_known_version_is_compared_under_that_version():
    older = Identity(NS, "k1", "h-v2", P(n=1), older=lambda v: "h-v1" if v == 1 else None)
    assert decide(older, View(known={(NS, "k1"): known("done", "h-v1", 1)})) is Decision.DUPLICATE
    assert decide(older, View(known={(NS, "k1"): known("done", "h-x", 1)})) is Decision.CONFLICT


def test_decide_changes_nothing_it_reads():
    i = (NS, "k1")
    view = View(claimed={i}, known={(NS, "k2"): known("done")})
    before = (set(view.claimed), dict(view.known), set(view.processed), dict(view.failed))
    for _ in range(3):
        decide(ident(), view)
        decide(ident("k2"), view)
    assert (view.claimed, view.known, view.processed, view.failed) == before
