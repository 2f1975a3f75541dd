"""Load generator for the payments service: realistic, messy traffic and the truth about it.

    python -m handlers.loadgen --count 50000 --dup-share 0.2 --conflict-share 0.02 \\
        --malformed-share 0.01 --tenants 3 --seed 7

sends ``--count`` records to ``payments.requested``, msgpack and JSON, from several tenants
(``tenant`` header), some asking for an answer (``reply-to``). Besides the original requests:

- duplicates: resent as they were, re-encoded in the other format with fields reordered and a
  new ``sent_at``/``trace_id``, sent to another partition, or resent much later;
- conflicts: a payment id reused with a different amount (a client bug);
- malformed records: undecodable bytes, schema-invalid payloads, no ``payment_id`` (the
  idempotency key; the schema requires it, so the reason is ``invalid_schema``), and a
  tenant header that is not UTF-8 (``bad_key``);
- overdrafts: payouts no account can cover, which the service rejects for good.

A record's partition follows its account, so one account's requests stay in order; only
copies of credits go to other partitions, where arriving early changes nothing. That makes
every outcome predictable: the ground truth (``--truth``, JSON lines: one header line, then one
line per record with its partition, offset and what the service must do with it) is exact.

Planning is a pure function of the arguments and the seed; only ``send`` does I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import UnknownTopicOrPartitionError

from consumer import codec, load_settings
from consumer.constants import CONTENT_JSON, CONTENT_MSGPACK, HEADER_CONTENT_TYPE, HEADER_REPLY_TO
from handlers.app import PREFIX, REQUESTED

REPLIES = f"{PREFIX}payments.replies"
# A payout larger than any account can hold, whatever order its credits arrive in.
OVERDRAFT_CENTS = 10**11
_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass(slots=True)
class Record:
    """One record to send, and what the service must do with it (``expect``)."""

    n: int
    kind: str  # original | duplicate | conflict | malformed
    style: str  # credit/debit/overdraft; resend/reencoded/other_partition/later; malformed kind
    payment_id: str
    account: str
    tenant: str
    cents: int
    partition: int
    reply: bool
    expect: str  # applied | rejected | duplicate | conflict | dead_letter
    reason: str = ""  # the dead-letter reason expected
    offset: int = -1
    value: bytes = field(default=b"", repr=False)
    headers: list[tuple[str, bytes]] = field(default_factory=list, repr=False)

    def truth(self) -> dict[str, Any]:
        row = asdict(self)
        del row["value"], row["headers"]
        return row


@dataclass(frozen=True, slots=True)
class Mix:
    """Shares of the records sent, and of the originals (debits, overdrafts, replies)."""

    dup: float = 0.2
    conflict: float = 0.02
    malformed: float = 0.01
    debit: float = 0.15
    overdraft: float = 0.01
    reply: float = 0.1


class Planner:
    """Builds the records of one run, deterministically from the seed."""

    def __init__(
        self, run: str, partitions: int, tenants: int, accounts: int, mix: Mix, seed: int
    ) -> None:
        self.run, self.partitions, self.mix = run, partitions, mix
        self.rng = random.Random(seed)
        self.accounts = [
            (f"{run}-acct-{i:03d}", f"tenant-{i % tenants + 1}") for i in range(accounts)
        ]
        # Balances in send order, counting what the service will apply: a debit is planned
        # only when the account can cover it at this point of its partition's order.
        self.balance = {name: 0 for name, _ in self.accounts}
        self.originals: list[Record] = []
        self.payloads: dict[str, dict[str, Any]] = {}
        self.records: list[Record] = []

    def plan(self, count: int) -> list[Record]:
        n_dup, n_conf, n_bad = (
            round(count * s) for s in (self.mix.dup, self.mix.conflict, self.mix.malformed)
        )
        n_orig = max(count - n_dup - n_conf - n_bad, 0)
        head = min(20, n_orig)  # copies need something to copy
        rest = ["original"] * (n_orig - head) + ["duplicate"] * n_dup
        rest += ["conflict"] * n_conf + ["malformed"] * n_bad
        self.rng.shuffle(rest)
        for kind in ["original"] * head + rest:
            getattr(self, f"_{kind}")()
        return self.records

    # ------------------------------------------------------------------ record kinds

    def _original(self) -> None:
        account, tenant = self.rng.choice(self.accounts)
        pid = f"{self.run}-pay-{len(self.originals):06d}"
        r, balance = self.rng.random(), self.balance[account]
        if r < self.mix.overdraft:
            style, cents, expect = "overdraft", -OVERDRAFT_CENTS, "rejected"
        elif r < self.mix.overdraft + self.mix.debit and balance >= 200:
            style, cents, expect = "debit", -self.rng.randint(100, balance // 2), "applied"
        else:
            style, cents, expect = "credit", self.rng.randint(100, 50_000), "applied"
        if expect == "applied":
            self.balance[account] += cents
        payload = {
            "schema_version": 1,
            "payment_id": pid,
            "account": account,
            "cents": cents,
            "currency": "EUR",
            "memo": f"{style} {len(self.records)}",
        }
        self.payloads[pid] = payload
        rec = self._add("original", style, payload, tenant, expect, self._home(account))
        self.originals.append(rec)
        self._encode(rec, payload, json_=self.rng.random() < 0.3, shuffle=False)

    def _duplicate(self) -> None:
        style = self.rng.choices(["resend", "reencoded", "other_partition", "later"], [3, 3, 2, 2])[
            0
        ]
        gap = max(100, len(self.records) // 10)
        if style == "later" and len(self.originals) > gap:
            orig = self.rng.choice(self.originals[: len(self.originals) - gap])
        else:
            style = "reencoded" if style == "later" else style
            orig = self.rng.choice(self.originals[-200:])
        partition = orig.partition
        if style == "other_partition" and orig.style != "debit" and self.partitions > 1:
            # A debit copy arriving early elsewhere could find the balance short: debits stay home.
            partition = (partition + self.rng.randrange(1, self.partitions)) % self.partitions
        elif style == "other_partition":
            style = "reencoded"
        payload = self.payloads[orig.payment_id]
        rec = self._add("duplicate", style, payload, orig.tenant, "duplicate", partition)
        if style == "resend":
            rec.value, rec.headers = (
                orig.value,
                [h for h in orig.headers if h[0] != HEADER_REPLY_TO],
            )
            self._maybe_reply(rec)
        else:
            original_json = (HEADER_CONTENT_TYPE, CONTENT_JSON.encode()) in orig.headers
            self._encode(rec, payload, json_=not original_json, shuffle=True)

    def _conflict(self) -> None:
        credits = [o for o in self.originals[-500:] if o.style == "credit"]
        if not credits:
            return self._original()
        orig = self.rng.choice(credits)
        payload = dict(self.payloads[orig.payment_id])
        payload["cents"] += self.rng.randint(1, 999)  # same id, another amount
        # Same account, so same partition, after the original: the original always wins.
        rec = self._add("conflict", "amount", payload, orig.tenant, "conflict", orig.partition)
        self._encode(rec, payload, json_=self.rng.random() < 0.5, shuffle=True)
        return None

    def _malformed(self) -> None:
        style = self.rng.choice(["undecodable", "invalid_schema", "missing_key", "bad_tenant"])
        account, tenant = self.rng.choice(self.accounts)
        pid = f"{self.run}-bad-{len(self.records):06d}"
        payload: dict[str, Any] = {"payment_id": pid, "account": account, "cents": 100}
        reason = {"undecodable": "undecodable", "bad_tenant": "bad_key"}.get(
            style, "invalid_schema"
        )
        partition = self.rng.randrange(self.partitions)
        rec = self._add("malformed", style, payload, tenant, "dead_letter", partition, reason)
        if style == "undecodable":
            rec.value = b'{"payment_id": "' + pid.encode() + b'", "cents": 1'  # truncated
            rec.headers = [(HEADER_CONTENT_TYPE, CONTENT_JSON.encode())]
            if self.rng.random() < 0.5:
                rec.value = b"\xc1" + self.rng.randbytes(12)  # 0xc1 is never valid msgpack
                rec.headers = [(HEADER_CONTENT_TYPE, CONTENT_MSGPACK.encode())]
            rec.headers.append(("tenant", tenant.encode()))
            return
        if style == "invalid_schema":
            payload["currency"] = "XBT"
        elif style == "missing_key":
            del payload["payment_id"]
            rec.payment_id = ""
        self._encode(rec, payload, json_=True, shuffle=False)
        if style == "bad_tenant":
            rec.headers = [(k, b"\xff\xfe" if k == "tenant" else v) for k, v in rec.headers]

    # ------------------------------------------------------------------ helpers

    def _home(self, account: str) -> int:
        return zlib.crc32(account.encode()) % self.partitions

    def _add(
        self,
        kind: str,
        style: str,
        payload: dict[str, Any],
        tenant: str,
        expect: str,
        partition: int,
        reason: str = "",
    ) -> Record:
        rec = Record(
            n=len(self.records),
            kind=kind,
            style=style,
            payment_id=str(payload.get("payment_id", "")),
            account=str(payload["account"]),
            tenant=tenant,
            cents=int(payload["cents"]),
            partition=partition,
            reply=False,
            expect=expect,
            reason=reason,
        )
        self.records.append(rec)
        return rec

    def _encode(self, rec: Record, payload: dict[str, Any], *, json_: bool, shuffle: bool) -> None:
        body = dict(payload)
        body["sent_at"] = (_EPOCH + timedelta(milliseconds=rec.n)).isoformat()
        body["trace_id"] = self.rng.randbytes(8).hex()
        if shuffle:
            items = list(body.items())
            self.rng.shuffle(items)
            body = dict(items)
        ctype = CONTENT_JSON if json_ else CONTENT_MSGPACK
        rec.value = codec.encode(body, ctype)
        rec.headers = [(HEADER_CONTENT_TYPE, ctype.encode()), ("tenant", rec.tenant.encode())]
        self._maybe_reply(rec)

    def _maybe_reply(self, rec: Record) -> None:
        if self.rng.random() < self.mix.reply:
            rec.reply = True
            rec.headers.append((HEADER_REPLY_TO, REPLIES.encode()))


async def send(
    records: list[Record], topic: str, bootstrap: str, rate: float = 0.0, quiet: bool = False
) -> None:
    """Send the records in order (idempotent producer) and fill in their offsets."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,  # keeps per-partition order through broker retries
        linger_ms=10,
        max_batch_size=256 * 1024,
    )
    await producer.start()
    try:
        started = time.monotonic()
        futures = []
        for i, rec in enumerate(records):
            futures.append(
                await producer.send(
                    topic,
                    rec.value,
                    key=rec.account.encode(),
                    partition=rec.partition,
                    headers=rec.headers,
                )
            )
            if rate > 0 and (ahead := (i + 1) / rate - (time.monotonic() - started)) > 0:
                await asyncio.sleep(ahead)
            if not quiet and (i + 1) % 10_000 == 0:
                print(f"loadgen: queued {i + 1}/{len(records)}", file=sys.stderr)
        for rec, meta in zip(records, await asyncio.gather(*futures), strict=True):
            rec.offset = meta.offset
    finally:
        await producer.stop()


def write_truth(path: Path, meta: dict[str, Any], records: list[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        out.write(json.dumps(meta) + "\n")
        for rec in records:
            out.write(json.dumps(rec.truth()) + "\n")


async def partitions_of(topic: str, bootstrap: str) -> int:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        return len(await producer.partitions_for(topic))
    finally:
        await producer.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m handlers.loadgen", description=__doc__.split("\n")[0]
    )
    p.add_argument("--count", type=int, default=10_000, help="records to send, copies included")
    p.add_argument("--dup-share", type=float, default=0.2)
    p.add_argument("--conflict-share", type=float, default=0.02)
    p.add_argument("--malformed-share", type=float, default=0.01)
    p.add_argument("--overdraft-share", type=float, default=0.01, help="of the originals")
    p.add_argument("--reply-share", type=float, default=0.1)
    p.add_argument("--tenants", type=int, default=3)
    p.add_argument("--accounts", type=int, default=300)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rate", type=float, default=0.0, help="records per second; 0 = flat out")
    p.add_argument("--run", default="", help="prefix of payment ids and accounts")
    p.add_argument("--topic", default=REQUESTED)
    p.add_argument("--truth", type=Path, help="where to write the ground truth (JSON lines)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    run = a.run or f"r{random.randrange(16**6):06x}"
    truth = a.truth or Path("out") / f"loadgen-{run}.jsonl"
    mix = Mix(
        a.dup_share,
        a.conflict_share,
        a.malformed_share,
        overdraft=a.overdraft_share,
        reply=a.reply_share,
    )
    bootstrap = load_settings(require_connections=False).kafka_bootstrap
    if not bootstrap:
        p.error("CONSUMER_KAFKA_BOOTSTRAP is not set (make services writes it to .env)")
    try:
        partitions = asyncio.run(partitions_of(a.topic, bootstrap))
    except UnknownTopicOrPartitionError:
        p.error(f"topic {a.topic!r} does not exist: create it first (make demo does)")
    records = Planner(run, partitions, a.tenants, a.accounts, mix, a.seed).plan(a.count)
    asyncio.run(send(records, a.topic, bootstrap, a.rate, a.quiet))
    kinds = Counter(f"{r.kind}/{r.style}" for r in records)
    meta = {
        "run": run,
        "topic": a.topic,
        "replies": REPLIES,
        "partitions": partitions,
        "count": len(records),
        "seed": a.seed,
        "mix": asdict(mix),
        "kinds": dict(sorted(kinds.items())),
    }
    write_truth(truth, meta, records)
    if not a.quiet:
        print(
            f"loadgen: sent {len(records)} records to {a.topic}; truth in {truth}", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
