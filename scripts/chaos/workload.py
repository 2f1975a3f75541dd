"""The chaos workload: seeded records for the payments app, and the ground truth they imply.

Every record carries a ``chaos-id`` header (not part of the payload hash) that names its entry
in the ground truth, so the checker can tell what each consumed offset should have become.

The expected outcome of every key is independent of processing order, because order across
partitions (and across crashes) is not something the system promises:

* ordinary accounts only receive credits, so every payment on them applies;
* reject accounts (``rej-*``) only receive debits and never a credit, so every payment on them
  is an overdraft, rejected for good;
* a conflicting copy (same key, different amount) goes to the same partition as its original
  and at least two produce chunks later, so the original always claims the key first;
* a schema-invalid record may share its payment id with a valid one: invalid records record
  nothing under their key, so the valid one applies whichever comes first.

This module only builds records; producing them is ``producer.py``'s job.
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgpack

from scripts.toolkit import truth

CONTENT_MSGPACK = "application/msgpack"
CONTENT_JSON = "application/json"
TENANTS = ("acme", "globex")


@dataclass(frozen=True, slots=True)
class Shares:
    """Fractions of the requested-topic records (the rest are first copies of a key)."""

    duplicates: float = 0.20
    conflicts: float = 0.02
    malformed: float = 0.015
    rejects: float = 0.04  # of the keys: payments on reject accounts
    tenant_twins: float = 0.02  # of the keys: a payment id reused under the other tenant
    downstream_malformed: float = 0.0025  # extra records on the downstream topic, no key


@dataclass(slots=True)
class Record:
    """One record to produce, with its ground truth."""

    id: int
    target: str  # "requested" | "settled"
    partition: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    truth: dict[str, Any]
    pos: float = 0.0


@dataclass
class Workload:
    seed: int
    partitions: int
    records: list[Record] = field(default_factory=list)  # in production order
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)  # "tenant|pid" -> outcome

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {"records": len(self.records), "unique_keys": len(self.keys)}
        for kind in ("original", "duplicate", "conflict", "malformed"):
            out[kind] = sum(1 for r in self.records if r.truth["kind"] == kind)
        out["rejects"] = sum(1 for k in self.keys.values() if k["outcome"] == "rejected")
        out["json_encoded"] = sum(1 for r in self.records if r.truth.get("encoding") == "json")
        out["cross_partition_duplicates"] = sum(
            1 for r in self.records if r.truth.get("dup_kind") == "other_partition"
        )
        out["late_duplicates"] = sum(1 for r in self.records if r.truth.get("dup_kind") == "late")
        out["tenant_twins"] = sum(1 for k in self.keys.values() if k.get("twin"))
        out["corrected_after_invalid"] = sum(1 for k in self.keys.values() if k.get("corrected"))
        return out

    def save(self, path: Path) -> None:
        """Ground truth: one entry per record id, one per key (see :func:`save_truth`)."""
        save_truth(
            path,
            {"seed": self.seed, "partitions": self.partitions, "keys": self.keys},
            {str(r.id): r.truth for r in self.records},
        )


def save_truth(path: Path, header: dict[str, Any], records: dict[str, dict[str, Any]]) -> None:
    """Write the ground truth in the toolkit's format: the header (seed, partitions, keys),
    then one line per record with its ``id``."""
    truth.write(path, header, ({"id": rid, **rec} for rid, rec in records.items()))


def load_truth(path: Path) -> dict[str, Any]:
    """The ground truth as the checker takes it: the header's fields and ``records`` by id."""
    t = truth.Truth.read(path)
    return {**t.meta, "records": {str(r.pop("id")): r for r in t.records}}


def key_id(tenant: str, pid: str) -> str:
    return f"{tenant}|{pid}"


def partition_of(pid: str, partitions: int) -> int:
    return zlib.crc32(pid.encode()) % partitions


class _Builder:
    def __init__(self, seed: int, total: int, partitions: int, shares: Shares) -> None:
        self.rng = random.Random(seed)
        self.total = total
        self.partitions = partitions
        self.shares = shares
        self.wl = Workload(seed, partitions)
        self.out: list[Record] = []
        self.t0 = datetime(2025, 1, 1, tzinfo=UTC)

    # ------------------------------------------------------------ encoding

    def _payload(self, pid: str, account: str, cents: int, memo: str) -> dict[str, Any]:
        sent = self.t0 + timedelta(seconds=self.rng.randrange(10**7))
        return {
            "schema_version": 1,
            "payment_id": pid,
            "account": account,
            "cents": cents,
            "currency": "EUR",
            "memo": memo,
            "sent_at": sent.isoformat(),
            "trace_id": f"{self.rng.getrandbits(64):016x}",  # excluded from the hash
        }

    def _encode(self, payload: dict[str, Any], as_json: bool) -> tuple[bytes, str]:
        if as_json:
            items = list(payload.items())
            self.rng.shuffle(items)  # field order is not part of identity
            return json.dumps(dict(items)).encode(), CONTENT_JSON
        return msgpack.packb(payload, use_bin_type=True), CONTENT_MSGPACK

    def _add(
        self,
        pos: float,
        partition: int,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]],
        truth: dict[str, Any],
        target: str = "requested",
    ) -> None:
        rid = len(self.out)
        truth = {"target": target, **truth}
        headers = [*headers, ("chaos-id", str(rid).encode())]
        self.out.append(Record(rid, target, partition, key, value, headers, truth, pos))

    def _request(
        self,
        pos: float,
        spec: dict[str, Any],
        partition: int,
        truth: dict[str, Any],
        as_json: bool,
        cents: int | None = None,
    ) -> None:
        payload = self._payload(
            spec["pid"], spec["account"], spec["cents"] if cents is None else cents, spec["memo"]
        )
        value, ctype = self._encode(payload, as_json)
        headers = [("tenant", spec["tenant"].encode()), ("content-type", ctype.encode())]
        truth = {
            "tenant": spec["tenant"],
            "pid": spec["pid"],
            "encoding": "json" if as_json else "msgpack",
            **truth,
        }
        self._add(pos, partition, spec["pid"].encode(), value, headers, truth)

    # ------------------------------------------------------------ the mix

    def build(self) -> Workload:
        s, rng, n = self.shares, self.rng, self.total
        n_dup = round(n * s.duplicates)
        n_conflict = round(n * s.conflicts)
        n_malformed = max(4, round(n * s.malformed))
        n_keys = n - n_dup - n_conflict - n_malformed
        specs = self._keys(n_keys)

        # First copies spread over the main body [0, 0.9); the tail is for late resends.
        first = {"kind": "original", "variant": 0, "expect": "key"}
        for i, spec in enumerate(specs):
            spec["pos"] = 0.9 * i / n_keys
            spec["part"] = partition_of(spec["pid"], self.partitions)
            self._request(spec["pos"], spec, spec["part"], first, rng.random() < 0.1)

        early = [sp for sp in specs if sp["pos"] < 0.45]
        for _ in range(n_dup):
            self._duplicate(rng.choice(specs), early)

        gap = max(0.1, 3 * self.chunk_fraction())
        candidates = [sp for sp in specs if sp["pos"] < 0.88 - gap and not sp.get("corrected")]
        for spec in rng.sample(candidates, n_conflict):
            delta = rng.randrange(1, 1000)
            cents = spec["cents"] + delta if spec["cents"] > 0 else spec["cents"] - delta
            pos = spec["pos"] + gap + rng.random() * (0.89 - gap - spec["pos"])
            truth = {"kind": "conflict", "variant": 1, "expect": "conflict"}
            self._request(pos, spec, spec["part"], truth, rng.random() < 0.2, cents=cents)

        self._malformed(n_malformed, specs)
        self._downstream_malformed(max(3, round(n * s.downstream_malformed)))

        self.out.sort(key=lambda r: (r.pos, r.id))
        self.wl.records = self.out
        return self.wl

    def chunk_fraction(self) -> float:
        return chunk_size(self.total) / self.total

    def _keys(self, n_keys: int) -> list[dict[str, Any]]:
        rng, s = self.rng, self.shares
        specs: list[dict[str, Any]] = []
        n_reject_accounts = max(2, n_keys // 250)
        for i in range(n_keys):
            tenant = TENANTS[i % len(TENANTS)]
            pid = f"pay-{i:06d}"
            twin = False
            if specs and rng.random() < s.tenant_twins:
                # Same payment id under the other tenant: a distinct key (tenant namespaces).
                other = rng.choice(specs[-200:])
                if other["tenant"] != tenant and key_id(tenant, other["pid"]) not in self.wl.keys:
                    pid, twin = other["pid"], True
            if rng.random() < s.rejects:
                account = f"rej-{rng.randrange(n_reject_accounts)}"
                cents = -rng.randrange(100, 50_000)
            else:
                account = f"acc-{rng.randrange(200)}"
                cents = rng.randrange(100, 50_000)
            memo = rng.choice(("", "rent", "invoice 42", "refund"))
            spec = {"tenant": tenant, "pid": pid, "account": account, "cents": cents, "memo": memo}
            if twin:
                spec["twin_of"] = True
            outcome = "applied" if cents > 0 else "rejected"
            self.wl.keys[key_id(tenant, pid)] = {
                "outcome": outcome,
                "account": account,
                "cents": cents,
                "twin": twin,
            }
            specs.append(spec)
        return specs

    def _duplicate(self, spec: dict[str, Any], early: list[dict[str, Any]]) -> None:
        rng = self.rng
        r = rng.random()
        part = spec["part"]
        if r < 0.3:
            kind, pos = "near", spec["pos"] + rng.random() * 30 / self.total
        elif r < 0.5:
            kind, pos = "same_partition", spec["pos"] + rng.random() * (0.9 - spec["pos"])
        elif r < 0.75:
            kind, pos = "other_partition", spec["pos"] + rng.random() * (0.9 - spec["pos"])
            part = (part + 1 + rng.randrange(self.partitions - 1)) % self.partitions
        else:
            spec = rng.choice(early) if early else spec
            kind, pos, part = "late", 0.9 + rng.random() * 0.1, spec["part"]
            if rng.random() < 0.5:
                part = (part + 1 + rng.randrange(self.partitions - 1)) % self.partitions
        truth = {"kind": "duplicate", "dup_kind": kind, "variant": 0, "expect": "key"}
        self._request(pos, spec, part, truth, rng.random() < 0.35)

    def _malformed(self, n: int, specs: list[dict[str, Any]]) -> None:
        rng = self.rng
        applied = [sp for sp in specs if sp["cents"] > 0 and "twin_of" not in sp]
        for i in range(n):
            tenant = TENANTS[i % len(TENANTS)]
            pos = rng.random()
            part = rng.randrange(self.partitions)
            which = i % 5
            headers = [("tenant", tenant.encode())]
            truth: dict[str, Any] = {"kind": "malformed", "tenant": tenant}
            if which == 0:  # not msgpack at all (0xc1 is never used by msgpack)
                value = b"\xc1" + rng.randbytes(20)
                headers.append(("content-type", CONTENT_MSGPACK.encode()))
                truth.update(expect="dead:undecodable", malformed="undecodable_msgpack")
            elif which == 1:  # truncated JSON
                value = b'{"payment_id": "pay-x", "cents": 1'
                headers.append(("content-type", CONTENT_JSON.encode()))
                truth.update(expect="dead:undecodable", malformed="undecodable_json")
            elif which == 2:  # schema-invalid, sharing the id of a valid payment
                spec = rng.choice(applied)
                spec["corrected"] = True
                self.wl.keys[key_id(spec["tenant"], spec["pid"])]["corrected"] = True
                bad = self._payload(spec["pid"], spec["account"], spec["cents"], "")
                bad["cents"] = "a lot"
                value, ctype = self._encode(bad, rng.random() < 0.5)
                headers = [("tenant", spec["tenant"].encode()), ("content-type", ctype.encode())]
                truth.update(
                    expect="dead:invalid_schema", malformed="invalid_schema", pid=spec["pid"]
                )
                truth["tenant"] = spec["tenant"]
                pos = rng.random() * spec["pos"]  # before the valid one: it must not burn it
            elif which == 3:  # a key over MAX_KEY_BYTES (100 x 3-byte characters)
                payload = self._payload("\u20ac" * 100, "acc-1", 100, "")
                value, ctype = self._encode(payload, False)
                headers.append(("content-type", ctype.encode()))
                truth.update(expect="dead:bad_key", malformed="key_too_long")
            else:  # a tenant header that is not UTF-8
                payload = self._payload(f"pay-badtenant-{i}", "acc-1", 100, "")
                value, ctype = self._encode(payload, False)
                headers = [("tenant", b"\xff\xfe"), ("content-type", ctype.encode())]
                truth.update(expect="dead:bad_key", malformed="tenant_not_utf8", tenant=None)
            self._add(pos, part, None, value, headers, truth)

    def _downstream_malformed(self, n: int) -> None:
        # Straight onto the downstream app's topic, without the idempotency-key header.
        for i in range(n):
            body = {"schema_version": 1, "payment_id": f"stray-{i}", "account": "acc-0"}
            body.update(cents=1, balance_cents=1)
            value = msgpack.packb(body, use_bin_type=True)
            headers = [("content-type", CONTENT_MSGPACK.encode())]
            truth = {"kind": "malformed", "malformed": "missing_key", "expect": "dead:missing_key"}
            self._add(
                self.rng.random(), self.rng.randrange(3), None, value, headers, truth, "settled"
            )


def chunk_size(total: int) -> int:
    """Records produced per burst (acks awaited between bursts, so bursts keep their order)."""
    return max(50, min(500, total // 40))


def build(seed: int, total: int, partitions: int = 6, shares: Shares | None = None) -> Workload:
    """The workload for ``total`` records on the requested topic (plus a few downstream)."""
    return _Builder(seed, total, partitions, shares or Shares()).build()


@dataclass
class Extra:
    """Ground truth added while the run goes, for the records the faults produce themselves.

    Ids are strings that cannot collide with the workload's numeric ``chaos-id``s.
    """

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (topic, partition, offset) -> headers, of records the Kafka client cannot parse
    unparseable: dict[tuple[str, int, int], dict[str, str]] = field(default_factory=dict)
    # chaos-id -> the record as sent, for those an operator may send again as they are
    # (not the aborted ones, nor the unparseable one: a plain copy would be another record)
    resendable: dict[str, Record] = field(default_factory=dict)

    def payment(
        self,
        cid: str,
        pid: str,
        cents: int,
        partitions: int,
        truth: dict[str, Any],
        outcome: str | None = "applied",
        tenant: str = TENANTS[0],
        account: str = "acc-7",
    ) -> Record:
        """A msgpack payment on ``pid``'s partition; ``outcome`` None leaves the key's truth."""
        body = {
            "schema_version": 1,
            "payment_id": pid,
            "account": account,
            "cents": cents,
            "currency": "EUR",
            "memo": "",
            "sent_at": "2025-01-01T00:00:00+00:00",
            "trace_id": "0" * 16,
        }
        headers = [
            ("tenant", tenant.encode()),
            ("content-type", CONTENT_MSGPACK.encode()),
            ("chaos-id", cid.encode()),
        ]
        part = partition_of(pid, partitions)
        self.records[cid] = {"target": "requested", "tenant": tenant, "pid": pid, **truth}
        if outcome is not None:
            self.keys[key_id(tenant, pid)] = {
                "outcome": outcome,
                "account": account,
                "cents": cents,
                "twin": False,
            }
        value = msgpack.packb(body, use_bin_type=True)
        rec = Record(0, "requested", part, pid.encode(), value, headers, self.records[cid])
        if truth["expect"] == "key":
            self.resendable[cid] = rec
        return rec

    def merge(self, truth: dict[str, Any]) -> None:
        truth["records"].update(self.records)
        truth["keys"].update(self.keys)
