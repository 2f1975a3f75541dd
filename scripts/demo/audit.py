"""The audit of a demo run: what the database and the topics hold, against the ground truth.

The load generator wrote down every record it sent and what the service must do with it
(``handlers/loadgen.py``, in the format of ``scripts/toolkit/truth.py``). Each check here
compares one guarantee with that truth, reading only committed state: the ``ledger`` (held
against the truth by ``scripts/toolkit/audit.py``), ``accounts`` and ``gateway_charges``
tables, the inbox and stored positions, and the output topics read from the beginning.
Nothing is inferred from worker logs or counters.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass

import asyncpg
import msgpack

from consumer.constants import (
    HEADER_DETAIL,
    HEADER_HASH,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_KEY,
    HEADER_OUTCOME,
    HEADER_REASON,
    HEADER_SOURCE,
    HEADER_STORED_HASH,
)
from scripts.demo.probe import Sample
from scripts.demo.setup import Names
from scripts.toolkit import topics
from scripts.toolkit.audit import audit_ledger
from scripts.toolkit.truth import Truth


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    expected: str
    observed: str
    ok: bool


@dataclass
class Report:
    checks: list[Check]
    dead_letters: Counter[str]  # "reason: first words of the detail" -> count
    conflicts: int

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


@dataclass(frozen=True, slots=True)
class Out:
    """One record read back from an output topic."""

    source: str
    headers: dict[str, str]
    value: bytes


async def read_topic(bootstrap: str, topic: str) -> list[Out]:
    """Every record of ``topic``, from the beginning to the end offsets at the time of the call."""
    out: list[Out] = []
    for r in await topics.read_topic(bootstrap, topic):
        headers = {k: bytes(v).decode() for k, v in r.headers or ()}
        out.append(Out(headers.get(HEADER_SOURCE, ""), headers, r.value or b""))
    return out


def _check(name: str, expected: object, observed: object, ok: bool | None = None) -> Check:
    return Check(name, str(expected), str(observed), expected == observed if ok is None else ok)


def _n(count: int, what: str) -> str:
    return f"{count:,} {what}"


async def run_audit(truth: Truth, names: Names, dsn: str, bootstrap: str, final: Sample) -> Report:
    """Every check of the run, in the order a reader would ask the questions."""
    originals = truth.where(kind="original")
    applied = {r["payment_id"]: r for r in originals if r["expect"] == "applied"}
    overdrafts = {r["payment_id"] for r in originals if r["expect"] == "rejected"}
    ids = sorted({r["payment_id"] for r in truth.records if r["payment_id"]})
    accounts = sorted({r["account"] for r in truth.records})
    checks: list[Check] = []

    sent = len(truth.records)
    checks.append(
        _check(
            "every record consumed (stored positions = end offsets)",
            _n(sent, "records"),
            _n(final.consumed, f"consumed of {final.sent:,} in the topic"),
            final.consumed == final.sent == sent,
        )
    )

    pg = await asyncpg.connect(dsn)
    try:
        ledger = await pg.fetch(
            "SELECT payment_id, account, cents, tenant FROM ledger WHERE payment_id = ANY($1)",
            ids,
        )
        inbox = await pg.fetch(
            "SELECT namespace, key, status, reason FROM dedup.inbox WHERE namespace = ANY($1)",
            names.namespaces,
        )
        balances = await pg.fetch(
            "SELECT account, balance_cents FROM accounts WHERE account = ANY($1)", accounts
        )
        # The handler charges under "<namespace>:<payment id>" (namespace = handler@tenant).
        charges = await pg.fetch(
            "SELECT idempotency_key, cents FROM gateway_charges WHERE idempotency_key = ANY($1)",
            [f"{ns}:{pid}" for ns in names.namespaces for pid in ids],
        )
    finally:
        await pg.close()

    effects = audit_ledger(
        {pid: (e["account"], e["cents"], e["tenant"]) for pid, e in applied.items()},
        ((r["payment_id"], (r["account"], r["cents"], r["tenant"])) for r in ledger),
    )
    twice = len(effects.twice)
    checks.append(_check("no payment applied twice (ledger rows per id)", 0, twice))
    wrong = sum(effects.altered.values()) + sum(effects.unexpected.values())
    missing = len(effects.missing)
    checks.append(
        _check(
            "applied set = expected (ids, amounts, tenants)",
            _n(len(applied), "payments"),
            _n(len(effects.per_key), f"payments; {missing} missing, {wrong} unexpected or altered"),
            missing == 0 and wrong == 0 and twice == 0,
        )
    )

    done = {r["key"] for r in inbox if r["status"] == "done"}
    rejected = {r["key"]: r["reason"] or "" for r in inbox if r["status"] == "rejected"}
    good_reasons = all(reason.startswith("overdraft") for reason in rejected.values())
    checks.append(
        _check(
            "overdrafts rejected for good (inbox)",
            _n(len(overdrafts), "rejected"),
            _n(len(rejected), "rejected" + ("" if good_reasons else ", some not overdrafts")),
            set(rejected) == overdrafts and good_reasons and done == set(applied),
        )
    )

    ledger_sum: dict[str, int] = defaultdict(int)
    for r in ledger:
        ledger_sum[r["account"]] += r["cents"]
    expected_balance: dict[str, int] = defaultdict(int)
    for r in applied.values():
        expected_balance[r["account"]] += r["cents"]
    stored = {r["account"]: r["balance_cents"] for r in balances}
    off = [
        a
        for a in set(stored) | set(expected_balance)
        if not stored.get(a, 0) == ledger_sum.get(a, 0) == expected_balance.get(a, 0)
    ]
    checks.append(
        _check(
            "balances = sum of ledger = expected, per account",
            _n(len(expected_balance), "accounts reconcile"),
            _n(len(stored) - len(off), f"reconcile, {len(off)} off"),
            not off,
        )
    )

    def charge_key(pid: str) -> str:
        tenant = applied[pid]["tenant"]
        return f"{names.namespace}@{tenant}:{pid}" if tenant else f"{names.namespace}:{pid}"

    charged = {r["idempotency_key"] for r in charges}
    expected_charges = {charge_key(pid) for pid in applied}
    checks.append(
        _check(
            "gateway charged once per applied payment",
            _n(len(applied), "charges"),
            _n(len(charges), "charges"),
            charged == expected_charges and len(charges) == len(applied),
        )
    )

    conflicts = await read_topic(bootstrap, names.conflicts)
    conflict_sources = {truth.source(r) for r in truth.where(kind="conflict")}
    got = {
        o.source
        for o in conflicts
        if o.headers.get(HEADER_HASH) != o.headers.get(HEADER_STORED_HASH)
    }
    checks.append(
        _check(
            "conflicts refused, each in .conflicts with both hashes",
            _n(len(conflict_sources), "conflicts"),
            _n(len(got), "conflicts"),
            got == conflict_sources,
        )
    )

    dlq = await read_topic(bootstrap, names.dlq)
    dead = {o.source: o for o in dlq}
    malformed = {truth.source(r): r["reason"] for r in truth.where(kind="malformed")}
    got_bad = {s: o.headers.get(HEADER_REASON) for s, o in dead.items() if s in malformed}
    reasons = Counter(got_bad.values())
    checks.append(
        _check(
            "malformed records dead-lettered with their reason",
            ", ".join(f"{n} {r}" for r, n in sorted(Counter(malformed.values()).items())),
            ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())),
            got_bad == malformed,
        )
    )
    rejected_dl = {
        o.headers.get(HEADER_KEY, "")
        for s, o in dead.items()
        if s not in malformed and o.headers.get(HEADER_REASON) == "rejected"
    }
    stray = len(dead) - len(got_bad) - len(rejected_dl)
    checks.append(
        _check(
            "each overdraft dead-lettered once, with its reason",
            _n(len(overdrafts), "dead letters"),
            _n(len(rejected_dl), f"dead letters, {stray} unexplained"),
            rejected_dl == overdrafts and stray == 0,
        )
    )

    settled = await read_topic(bootstrap, names.settled)
    event_ids = {msgpack.unpackb(o.value)["payment_id"] for o in settled}
    keys = {o.headers.get(HEADER_IDEMPOTENCY_KEY) for o in settled}
    checks.append(
        _check(
            "one PaymentSettled event per applied payment",
            _n(len(applied), "distinct events"),
            _n(len(keys), f"distinct events ({len(settled):,} published; copies carry one key)"),
            event_ids == set(applied) and len(keys) == len(applied),
        )
    )

    replies = await read_topic(bootstrap, names.replies)
    asked = {
        r["payment_id"]
        for r in truth.records
        if r["reply"] and r["kind"] in ("original", "duplicate")
    }
    answered = {o.headers.get(HEADER_KEY) for o in replies}
    to_conflicts = sum(1 for o in replies if o.source in conflict_sources)
    wrong_outcome = sum(
        1
        for o in replies
        if o.headers.get(HEADER_OUTCOME)
        != ("rejected" if o.headers.get(HEADER_KEY) in overdrafts else "done")
    )
    checks.append(
        _check(
            "each request that asked got its answer; no conflict did",
            _n(len(asked), "payments answered"),
            _n(len(answered), f"answered, {to_conflicts} to conflicts, {wrong_outcome} wrong"),
            answered == asked and to_conflicts == 0 and wrong_outcome == 0,
        )
    )

    dups = len(truth.where(kind="duplicate"))
    checks.append(
        _check(
            "duplicates skipped (consumed minus the rest)",
            _n(dups, "duplicates"),
            _n(final.duplicates, "duplicates"),
        )
    )
    return Report(checks, _reasons(dlq), len(conflicts))


def _reasons(dlq: list[Out]) -> Counter[str]:
    """Dead letters by reason and detail, numbers blanked so that alike details group."""
    counts: Counter[str] = Counter()
    for o in dlq:
        detail = re.sub(r"\s*\(\d+ error\(s\)\)$", "", o.headers.get(HEADER_DETAIL, ""))
        detail = re.sub(r"(?<![A-Za-z-])-?\d+", "N", detail)[:90]
        counts[f"{o.headers.get(HEADER_REASON, '?')}: {detail}"] += 1
    return counts
