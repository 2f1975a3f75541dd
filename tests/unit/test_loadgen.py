"""The load generator's plan: its ground truth must be exact, or the demo's audit means nothing."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from consumer import codec
from consumer.constants import HEADER_CONTENT_TYPE
from consumer.dedup.hashing import payload_hash
from handlers.loadgen import Mix, Planner, Record
from schemas.payments import PaymentRequested

pytestmark = pytest.mark.unit

HASH_EXCLUDE = {"sent_at", "trace_id"}


def plan(count: int = 5_000, seed: int = 3) -> list[Record]:
    return Planner("t", partitions=6, tenants=3, accounts=40, mix=Mix(), seed=seed).plan(count)


def parse(rec: Record) -> PaymentRequested:
    ctype = dict(rec.headers)[HEADER_CONTENT_TYPE].decode()
    return PaymentRequested.model_validate(codec.decode(rec.value, ctype))


def test_same_seed_same_plan_and_shares_hold():
    a, b = plan(), plan()
    assert [(r.value, r.partition, r.expect) for r in a] == [
        (r.value, r.partition, r.expect) for r in b
    ]
    kinds = Counter(r.kind for r in a)
    assert (kinds["duplicate"], kinds["conflict"], kinds["malformed"]) == (1000, 100, 50)
    assert sum(kinds.values()) == 5_000


def test_copies_hash_like_their_original_and_conflicts_do_not():
    records = plan()
    first = {r.payment_id: r for r in records if r.kind == "original"}
    for rec in records:
        if rec.kind not in ("duplicate", "conflict"):
            continue
        orig = first[rec.payment_id]
        assert orig.n < rec.n and rec.tenant == orig.tenant
        same = payload_hash(parse(rec), HASH_EXCLUDE) == payload_hash(parse(orig), HASH_EXCLUDE)
        assert same is (rec.kind == "duplicate")
        if rec.kind == "conflict":  # after its original, on the same partition: it never wins
            assert rec.partition == orig.partition


def test_outcomes_do_not_depend_on_partition_interleaving():
    records = plan()
    style = {r.payment_id: r.style for r in records if r.kind == "original"}
    balance: dict[str, int] = defaultdict(int)
    for rec in records:
        if rec.kind == "duplicate" and rec.style == "other_partition":
            # Debits never travel: arriving early they could find the balance short. Credits
            # and overdrafts may: their outcome is the same whenever they arrive.
            assert style[rec.payment_id] in ("credit", "overdraft")
        if rec.kind == "original" and rec.expect == "applied":
            balance[rec.account] += rec.cents
            assert balance[rec.account] >= 0  # in the account's own partition order
    # An overdraft exceeds every credit the account could ever receive.
    total_credits = sum(r.cents for r in records if r.kind == "original" and r.cents > 0)
    assert all(
        -r.cents > total_credits for r in records if r.kind == "original" and r.expect == "rejected"
    )


def test_malformed_records_fail_for_the_reason_expected():
    for rec in plan():
        if rec.kind != "malformed":
            continue
        ctype = dict(rec.headers)[HEADER_CONTENT_TYPE].decode()
        if rec.reason == "undecodable":
            with pytest.raises(Exception, match="not valid"):
                codec.decode(rec.value, ctype)
        elif rec.reason == "invalid_schema":
            with pytest.raises(ValueError):
                PaymentRequested.model_validate(codec.decode(rec.value, ctype))
        else:
            assert rec.reason == "bad_key"
            assert dict(rec.headers)["tenant"] == b"\xff\xfe"
