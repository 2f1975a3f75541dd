"""The offline checker: ground truth against the effects, the inbox, the topics. No trust.

It never asks the system under test what happened; it reads what the system left behind (the
ledger, which has no unique constraint; the inbox; the stored offsets; the dead-letter and
conflict topics; the downstream effects table) and holds it against the ground truth the
generator wrote. Two levels:

* per key: applied exactly once with the original payload, or rejected exactly once with a
  dead letter; never twice, never lost, never a conflicting payload;
* per consumed offset: applied, duplicate, conflict (on the conflict topic) or dead-lettered
  with the expected reason. Anything else, including an offset never consumed, is
  *unclassified*.

Records of aborted upstream transactions (the ``aborted_transactions`` fault) take no effect:
no ledger row, no inbox row, no dead letter; a key only ever aborted stays unknown.

Downstream: every applied payment reaches the downstream table exactly once, however many
times the relay published it; strays without a key are dead-lettered with ``missing_key``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from scripts.chaos.collect import Evidence, Rec
from scripts.toolkit.audit import LedgerAudit, audit_ledger

INVARIANTS = (
    "double_applied",
    "lost",
    "conflicts_applied",
    "rejects_applied",
    "unclassified",
    "unexpected_dead_letters",
    "unexpected_effects",
    "inbox_mismatch",
    "downstream_duplicates",
    "downstream_lost",
    "aborted_applied",
)


@dataclass(frozen=True)
class Names:
    requested: str
    settled: str
    group: str
    downstream_group: str
    namespace: str  # the payments handler's name; "@tenant" is appended per tenant

    def ns(self, tenant: str | None) -> str:
        return f"{self.namespace}@{tenant}" if tenant else self.namespace


@dataclass
class Result:
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def bad(self, what: str, example: str) -> None:
        self.counts[what] += 1
        if len(self.examples[what]) < 5:
            self.examples[what].append(example)

    @property
    def violations(self) -> dict[str, int]:
        return {k: self.counts[k] for k in INVARIANTS if self.counts[k]}

    @property
    def ok(self) -> bool:
        return not self.violations


def _src(r: Rec, with_id: bool) -> str:
    # With the chaos-id (dead letters and conflict reports keep the original headers): a
    # re-created topic reuses offsets, so "topic/partition/offset" alone is ambiguous.
    src = r.headers.get("x-source", "")
    return f"{src}#{r.headers.get('chaos-id', '')}" if with_id else src


def _by_source(recs: list[Rec], with_id: bool = False) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for r in recs:
        out[_src(r, with_id)].add(r.headers.get("x-reason", ""))
    return out


def _with_both_hashes(recs: list[Rec]) -> set[str]:
    # A conflict report must name both payload hashes (the new one and the stored one).
    return {
        _src(r, True)
        for r in recs
        if r.headers.get("x-payload-hash")
        and r.headers.get("x-stored-hash")
        and r.headers["x-payload-hash"] != r.headers["x-stored-hash"]
    }


def check(truth: dict[str, Any], ev: Evidence, names: Names) -> Result:
    res = Result()
    records: dict[str, dict[str, Any]] = truth["records"]
    keys: dict[str, dict[str, Any]] = truth["keys"]
    topics = ev.topics
    dlq_plain = _by_source(topics.get(names.requested + ".dlq", []))
    dlq = _by_source(topics.get(names.requested + ".dlq", []), with_id=True)
    conflicts = _by_source(topics.get(names.requested + ".conflicts", []), with_id=True)

    ledger: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for tenant, pid, account, cents in ev.ledger:
        ledger[f"{tenant}|{pid}"].append((account, cents))
    audit = audit_ledger(
        {k: (e["account"], e["cents"]) for k, e in keys.items() if e["outcome"] == "applied"},
        ((f"{tenant}|{pid}", (account, cents)) for tenant, pid, account, cents in ev.ledger),
    )

    # ------------------------------------------------------------ per key
    applied_keys: set[str] = set()
    for kid, exp in keys.items():
        tenant, _, pid = kid.partition("|")
        rows = ledger.get(kid, [])
        rec = ev.inbox.get((names.ns(tenant), pid))
        if exp["outcome"] == "never":  # only ever produced in aborted transactions
            if rows or rec is not None:
                res.bad("aborted_applied", f"{kid}: aborted only; ledger {rows}, inbox {rec}")
            else:
                res.counts["aborted_keys_untouched"] += 1
        elif exp["outcome"] == "applied":
            if _applied(res, kid, exp, rows, rec, audit):
                applied_keys.add(kid)
        else:
            _rejected(res, kid, rows, rec, dlq_plain)
    for kid, n in audit.unexpected.items():
        if kid not in keys:
            res.bad("unexpected_effects", f"{kid}: {n} ledger row(s) for no such key")

    # ------------------------------------------------------------ per consumed offset
    _offsets(res, names, records, keys, ev, dlq, conflicts, applied_keys)

    # ------------------------------------------------------------ downstream
    _downstream(res, names, records, ev, applied_keys)
    return res


def _applied(
    res: Result,
    kid: str,
    exp: dict[str, Any],
    rows: list[tuple[str, int]],
    rec: dict[str, Any] | None,
    audit: LedgerAudit,
) -> bool:
    """A key expected applied: once, with its original payload, done in the inbox."""
    if kid in audit.missing:
        res.bad("lost", f"{kid}: expected applied, no ledger row (inbox: {rec})")
        return False
    res.counts["applied"] += 1
    if kid in audit.twice:
        res.bad("double_applied", f"{kid}: {len(rows)} ledger rows")
    if kid in audit.altered:
        res.bad("conflicts_applied", f"{kid}: ledger {rows}, original {exp['cents']}")
    if rec is None or rec["status"] != "done":
        res.bad("inbox_mismatch", f"{kid}: applied, inbox says {rec and rec['status']}")
    return True


def _rejected(
    res: Result,
    kid: str,
    rows: list[tuple[str, int]],
    rec: dict[str, Any] | None,
    dlq_plain: dict[str, set[str]],
) -> None:
    """A key expected rejected: no ledger row, rejected in the inbox, one dead letter."""
    if rows:
        res.bad("rejects_applied", f"{kid}: overdraft applied {len(rows)}x")
    if rec is None or rec["status"] != "rejected":
        res.bad("lost", f"{kid}: expected rejected, inbox {rec and rec['status']}")
        return
    res.counts["rejected"] += 1
    src = f"{rec['topic']}/{rec['partition']}/{rec['offset']}"
    if "rejected" not in dlq_plain.get(src, set()):
        res.bad("lost", f"{kid}: rejected at {src} but no dead letter")


def _offsets(
    res: Result,
    names: Names,
    records: dict[str, dict[str, Any]],
    keys: dict[str, dict[str, Any]],
    ev: Evidence,
    dlq: dict[str, set[str]],
    conflicts: dict[str, set[str]],
    applied_keys: set[str],
) -> None:
    topic = names.requested
    conflict_hashes = _with_both_hashes(ev.topics.get(topic + ".conflicts", []))
    expected_dead: set[str] = set()
    conflict_sources: set[str] = set()
    rejected_copies: set[str] = set()  # consumed copies of a rejected key, not the deciding one
    seen_ids: Counter[str] = Counter()
    for r in ev.topics.get(topic, []):
        cid = r.headers.get("chaos-id")
        plain = r.source(topic)
        src = f"{plain}#{cid or ''}"
        t = records.get(cid or "")
        if t is None:
            res.bad("unclassified", f"{src}: no ground truth (chaos-id {cid!r})")
            continue
        expect: str = t["expect"]
        kid = f"{t.get('tenant')}|{t.get('pid')}"
        rec = ev.inbox.get((names.ns(t.get("tenant")), t.get("pid", "")))
        first = rec is not None and (rec["topic"], rec["partition"], rec["offset"]) == (
            topic,
            r.partition,
            r.offset,
        )
        if expect == "aborted":  # a read_committed consumer never sees it
            if src in dlq or src in conflicts or first:
                res.bad("aborted_applied", f"{src}: record of an aborted transaction consumed")
            else:
                res.counts["aborted_offsets"] += 1
            continue
        if r.generation:  # a deleted incarnation of the topic (topic_recreate)
            if r.offset >= ev.retired_consumed[r.generation].get(r.partition, 0):
                # Destroyed by the deletion before anyone read it: the operator's loss, and
                # the operator re-produced it into the new topic (counted there).
                res.counts["lost_by_operator"] += 1
                continue
        elif r.offset >= ev.offsets.get((names.group, topic, r.partition), 0):
            res.bad("unclassified", f"{src}: never consumed")
            continue
        seen_ids[cid or ""] += 1
        res.counts["consumed"] += 1
        if expect.startswith("dead:"):
            # An unparseable record's dead letter carries its raw bytes, not its headers: no
            # chaos-id to match, only the source.
            expected_dead.update((src, f"{plain}#"))
            reason = expect[5:]
            got = dlq.get(src, set()) | dlq.get(f"{plain}#", set())
            if reason in got:
                res.counts["dead_lettered"] += 1
                res.counts[f"dead_lettered:{reason}"] += 1
            else:
                res.bad("unclassified", f"{src}: expected dead letter {reason}, got {got or None}")
            continue
        if expect == "conflict":
            conflict_sources.add(src)
            if src in conflicts and src in conflict_hashes:
                res.counts["conflict_offsets"] += 1
            elif src in conflicts:
                res.bad("unclassified", f"{src}: on .conflicts without both payload hashes")
            else:
                res.bad("unclassified", f"{src}: conflicting copy of {t['pid']} not on .conflicts")
            continue
        if keys[kid]["outcome"] == "applied":
            if kid not in applied_keys:
                res.bad("unclassified", f"{src}: key {kid} never applied")
            else:
                res.counts["applied_offsets" if first else "duplicate_offsets"] += 1
        elif rec is None or rec["status"] != "rejected":
            res.bad("unclassified", f"{src}: key {kid} never rejected")
        elif first:
            expected_dead.add(src)
            if "rejected" in dlq.get(src, set()):
                res.counts["dead_lettered"] += 1
                res.counts["dead_lettered:rejected"] += 1
            else:
                res.bad("unclassified", f"{src}: rejected here but no dead letter")
        else:
            rejected_copies.add(src)
            res.counts["duplicate_offsets"] += 1
    for src, reasons in dlq.items():
        if src in expected_dead:
            continue
        if ev.db_rewound and src in rejected_copies and reasons == {"rejected"}:
            # Rejected before PostgreSQL lost the rejection, rejected again after it at
            # another copy (which the inbox now names): the same verdict, sent twice.
            res.counts["rejections_repeated"] += 1
        else:
            res.bad("unexpected_dead_letters", f"{src}: dead-lettered ({sorted(reasons)})")
    for src in conflicts:
        if src not in conflict_sources:
            res.bad("unexpected_dead_letters", f"{src}: on .conflicts but not a conflict")
    res.counts["producer_copies"] = sum(n - 1 for n in seen_ids.values() if n > 1)


def _downstream(
    res: Result,
    names: Names,
    records: dict[str, dict[str, Any]],
    ev: Evidence,
    applied_keys: set[str],
) -> None:
    topic = names.settled
    effects: Counter[str] = Counter(row["idempotency_key"] for row in ev.downstream)
    expected_ik = {}
    for kid in applied_keys:
        tenant, _, pid = kid.partition("|")
        expected_ik[f"{names.ns(tenant)}:{pid}:0"] = kid
    dlq = _by_source(ev.topics.get(topic + ".dlq", []))
    published: Counter[str] = Counter()
    for r in ev.topics.get(topic, []):
        src = r.source(topic)
        if r.offset >= ev.offsets.get((names.downstream_group, topic, r.partition), 0):
            res.bad("unclassified", f"{src}: never consumed downstream")
            continue
        cid = r.headers.get("chaos-id")
        if cid is not None:  # a stray injected by the workload
            reason = records[cid]["expect"][5:]
            if reason in dlq.get(src, set()):
                res.counts["dead_lettered"] += 1
                res.counts[f"dead_lettered:{reason}"] += 1
            else:
                res.bad("unclassified", f"{src}: expected dead letter {reason}, got {dlq.get(src)}")
            continue
        ik = r.headers.get("idempotency-key", "")
        published[ik] += 1
        if ik not in expected_ik:
            res.bad("unexpected_effects", f"{src}: settled {ik!r} for no applied payment")
        elif not effects.get(ik):
            res.bad("unclassified", f"{src}: settled {ik!r} never applied downstream")
    res.counts["settled_published"] = sum(published.values())
    res.counts["relay_republished"] = sum(n - 1 for n in published.values() if n > 1)
    for ik, n in effects.items():
        if n > 1:
            res.bad("downstream_duplicates", f"{ik}: {n} downstream rows")
    for ik, kid in expected_ik.items():
        if not effects.get(ik):
            res.bad("downstream_lost", f"{kid}: applied upstream, not downstream")
