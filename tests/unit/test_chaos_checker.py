"""The chaos checker on hand-made evidence: silent when all is well, loud for each violation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from scripts.chaos.checker import Names, check
from scripts.chaos.collect import Evidence, Rec

pytestmark = pytest.mark.unit

N = Names("req", "settled", "payments", "down", "payments.settle")
IK = "payments.settle@acme:p1:0"
TRUTH: dict[str, Any] = {
    "records": {
        "0": {"kind": "original", "tenant": "acme", "pid": "p1", "expect": "key"},
        "1": {"kind": "duplicate", "tenant": "acme", "pid": "p1", "expect": "key"},
        "2": {"kind": "conflict", "tenant": "acme", "pid": "p1", "expect": "conflict"},
        "3": {"kind": "malformed", "expect": "dead:undecodable"},
    },
    "keys": {"acme|p1": {"outcome": "applied", "account": "acc-1", "cents": 100}},
}


def _rec(offset: int, **headers: str) -> Rec:
    return Rec(0, offset, None, b"", {k.replace("_", "-"): v for k, v in headers.items()})


def evidence() -> Evidence:
    ev = Evidence()
    ev.topics = {
        "req": [_rec(i, chaos_id=str(i)) for i in range(4)],
        # Dead letters and conflict reports keep the original headers, chaos-id included.
        "req.dlq": [_rec(0, x_source="req/0/3", x_reason="undecodable", chaos_id="3")],
        "req.conflicts": [
            _rec(
                0,
                x_source="req/0/2",
                x_reason="conflict",
                x_payload_hash="b",
                x_stored_hash="a",
                chaos_id="2",
            )
        ],
        "settled": [_rec(0, idempotency_key=IK), _rec(1, idempotency_key=IK)],  # relay re-send
        "settled.dlq": [],
    }
    ev.ledger = [("acme", "p1", "acc-1", 100)]
    ev.inbox = {
        ("payments.settle@acme", "p1"): {
            "status": "done",
            "topic": "req",
            "partition": 0,
            "offset": 0,
        }
    }
    ev.offsets = {("payments", "req", 0): 4, ("down", "settled", 0): 2}
    ev.downstream = [{"idempotency_key": IK}]
    return ev


def test_a_clean_run_classifies_every_offset() -> None:
    res = check(TRUTH, evidence(), N)
    assert res.ok, res.violations
    c = res.counts
    assert (c["applied_offsets"], c["duplicate_offsets"], c["conflict_offsets"]) == (1, 1, 1)
    assert c["dead_lettered"] == 1 and c["relay_republished"] == 1


def _double(ev: Evidence) -> None:
    ev.ledger.append(("acme", "p1", "acc-1", 100))


def _conflict_won(ev: Evidence) -> None:
    ev.ledger = [("acme", "p1", "acc-1", 101)]


def _lost(ev: Evidence) -> None:
    ev.ledger = []


def _unconsumed(ev: Evidence) -> None:
    ev.offsets[("payments", "req", 0)] = 3


def _no_dead_letter(ev: Evidence) -> None:
    ev.topics["req.dlq"] = []


def _conflict_without_hashes(ev: Evidence) -> None:
    ev.topics["req.conflicts"] = [_rec(0, x_source="req/0/2", x_reason="conflict", chaos_id="2")]


def _downstream_twice(ev: Evidence) -> None:
    ev.downstream.append({"idempotency_key": IK})


def _wrongly_dead_lettered(ev: Evidence) -> None:
    ev.topics["req.dlq"].append(_rec(1, x_source="req/0/1", x_reason="rejected", chaos_id="1"))


@pytest.mark.parametrize(
    ("breakage", "violation"),
    [
        (_double, "double_applied"),
        (_conflict_won, "conflicts_applied"),
        (_lost, "lost"),
        (_unconsumed, "unclassified"),
        (_no_dead_letter, "unclassified"),
        (_conflict_without_hashes, "unclassified"),
        (_downstream_twice, "downstream_duplicates"),
        (_wrongly_dead_lettered, "unexpected_dead_letters"),
    ],
)
def test_each_violation_is_reported(breakage: Callable[[Evidence], None], violation: str) -> None:
    ev = evidence()
    breakage(ev)
    res = check(TRUTH, ev, N)
    assert not res.ok
    assert res.violations.get(violation, 0) >= 1, res.violations


# ---------------------------------------------------------------- aborted transactions

ABORTED: dict[str, Any] = {
    "records": {
        **TRUTH["records"],
        "t-a0": {"kind": "aborted", "tenant": "acme", "pid": "t0", "expect": "aborted"},
    },
    "keys": {**TRUTH["keys"], "acme|t0": {"outcome": "never", "account": "a", "cents": 1}},
}


def _with_aborted(ev: Evidence) -> Evidence:
    # The aborted record sits at offset 4; a read_committed consumer goes past it.
    ev.topics["req"].append(_rec(4, chaos_id="t-a0"))
    ev.offsets[("payments", "req", 0)] = 6  # past the abort marker at 5
    return ev


def test_aborted_records_left_alone_are_counted_not_reported() -> None:
    res = check(ABORTED, _with_aborted(evidence()), N)
    assert res.ok, res.violations
    assert res.counts["aborted_offsets"] == 1 and res.counts["aborted_keys_untouched"] == 1


def test_an_applied_aborted_record_is_reported() -> None:
    ev = _with_aborted(evidence())
    ev.ledger.append(("acme", "t0", "a", 1))
    ev.inbox[("payments.settle@acme", "t0")] = {
        "status": "done",
        "topic": "req",
        "partition": 0,
        "offset": 4,
    }
    res = check(ABORTED, ev, N)
    assert res.violations.get("aborted_applied", 0) == 2, res.violations


# ---------------------------------------------------------------- a re-created topic


def _recreated(ev: Evidence) -> Evidence:
    """Offsets 0-3 are the retired generation (consumed up to 2: records 2 and 3 were
    destroyed unread); the re-created topic holds 2 and 3 again, re-produced at 0 and 1."""
    old = ev.topics["req"]
    ev.topics["req"] = [_rec(0, chaos_id="2"), _rec(1, chaos_id="3")]
    ev.topics["req"] += [Rec(r.partition, r.offset, None, b"", r.headers, 1) for r in old]
    ev.retired_consumed = {1: {0: 2}}
    ev.topics["req.dlq"] = [_rec(0, x_source="req/0/1", x_reason="undecodable", chaos_id="3")]
    ev.topics["req.conflicts"][0] = _rec(
        0,
        x_source="req/0/0",
        x_reason="conflict",
        x_payload_hash="b",
        x_stored_hash="a",
        chaos_id="2",
    )
    ev.offsets[("payments", "req", 0)] = 2
    return ev


def test_records_destroyed_by_a_deletion_and_reproduced_are_the_operators() -> None:
    res = check(TRUTH, _recreated(evidence()), N)
    assert res.ok, res.violations
    assert res.counts["lost_by_operator"] == 2 and res.counts["consumed"] == 4


def test_a_reused_offset_does_not_stand_for_another_records_dead_letter() -> None:
    ev = _recreated(evidence())
    # The new generation's record at offset 1 skipped; the retired generation's offset 1
    # (record 1, a duplicate) has no dead letter: it must not count for record 3.
    ev.topics["req.dlq"] = [_rec(0, x_source="req/0/1", x_reason="undecodable", chaos_id="1")]
    res = check(TRUTH, ev, N)
    assert res.violations.get("unclassified", 0) >= 1, res.violations


def test_a_dead_letter_without_the_records_headers_counts_by_its_source() -> None:
    # An unparseable record is dead-lettered with its raw bytes: no chaos-id header.
    ev = evidence()
    ev.topics["req.dlq"] = [_rec(0, x_source="req/0/3", x_reason="undecodable")]
    res = check(TRUTH, ev, N)
    assert res.ok, res.violations
    assert res.counts["dead_lettered:undecodable"] == 1


# ---------------------------------------------------------------- PostgreSQL rewound

REJECTED: dict[str, Any] = {
    "records": {
        "0": {"kind": "original", "tenant": "acme", "pid": "r1", "expect": "key"},
        "1": {"kind": "duplicate", "tenant": "acme", "pid": "r1", "expect": "key"},
    },
    "keys": {"acme|r1": {"outcome": "rejected", "account": "rej-1", "cents": -5}},
}


def _rejected_twice(rewound: bool) -> Evidence:
    """The original rejected (its dead letter sent), PostgreSQL forgot it, the copy decided."""
    ev = Evidence()
    ev.topics = {
        "req": [_rec(0, chaos_id="0"), _rec(1, chaos_id="1")],
        "req.dlq": [
            _rec(0, x_source="req/0/0", x_reason="rejected", chaos_id="0"),
            _rec(1, x_source="req/0/1", x_reason="rejected", chaos_id="1"),
        ],
        "req.conflicts": [],
        "settled": [],
        "settled.dlq": [],
    }
    ev.inbox = {
        ("payments.settle@acme", "r1"): {
            "status": "rejected",
            "topic": "req",
            "partition": 0,
            "offset": 1,
        }
    }
    ev.offsets = {("payments", "req", 0): 2}
    ev.db_rewound = rewound
    return ev


def test_a_rejection_repeated_after_postgres_lost_the_first_is_counted_not_reported() -> None:
    res = check(REJECTED, _rejected_twice(rewound=True), N)
    assert res.ok, res.violations
    assert res.counts["rejections_repeated"] == 1 and res.counts["rejected"] == 1


def test_a_rejection_repeated_without_a_lost_database_is_reported() -> None:
    res = check(REJECTED, _rejected_twice(rewound=False), N)
    assert res.violations.get("unexpected_dead_letters") == 1, res.violations
