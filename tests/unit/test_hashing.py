"""The payload hash: equal for the same logical payload however it was encoded, else different."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import msgpack
import pytest
from pydantic import BaseModel

from consumer import App, Message
from consumer.constants import HASH_ALG
from consumer.dedup.hashing import canonical_bytes, payload_hash
from consumer.dedup.identity import identify
from schemas.payments import PaymentRequested

pytestmark = pytest.mark.unit

BASE = {"payment_id": "p-1", "account": "acc", "cents": 150, "currency": "EUR", "memo": "m"}


def _handler(hash_exclude: set[str] | None = None):
    app = App("g")

    @app.handler(
        "t", schema=PaymentRequested, key=lambda p: p.payment_id, hash_exclude=hash_exclude
    )
    async def settle(p: PaymentRequested, ctx: object) -> None:
        return None

    return settle


def _msg(value: bytes, content_type: str | None) -> Message:
    headers = (("content-type", content_type.encode()),) if content_type else ()
    return Message("t", 0, 0, None, value, headers)


def _hash_of(value: bytes, content_type: str | None, hash_exclude: set[str] | None = None) -> str:
    return identify(_handler(hash_exclude), _msg(value, content_type)).hash


def test_msgpack_and_json_hash_equal():
    as_msgpack = _hash_of(msgpack.packb(BASE), None)
    as_msgpack_named = _hash_of(msgpack.packb(BASE), "application/msgpack")
    as_json = _hash_of(json.dumps(BASE).encode(), "application/json")
    assert as_msgpack == as_msgpack_named == as_json


def test_field_order_does_not_matter():
    reordered = dict(reversed(list(BASE.items())))
    assert list(reordered) != list(BASE)
    assert _hash_of(json.dumps(reordered).encode(), "application/json") == _hash_of(
        json.dumps(BASE).encode(), "application/json"
    )


def test_defaults_spelled_out_or_omitted_hash_equal():
    # currency and memo have defaults: the validated payload is what is hashed, not the bytes.
    short = {"payment_id": "p-1", "account": "acc", "cents": 150}
    full = {**short, "currency": "EUR", "memo": "", "schema_version": 1}
    assert _hash_of(msgpack.packb(short), None) == _hash_of(msgpack.packb(full), None)


def test_any_payload_difference_changes_the_hash():
    base = _hash_of(msgpack.packb(BASE), None)
    for field, value in [("cents", 151), ("account", "acc2"), ("memo", "x"), ("currency", "USD")]:
        assert _hash_of(msgpack.packb({**BASE, field: value}), None) != base, field


def test_hash_exclude_fields_are_not_part_of_identity():
    a = {**BASE, "sent_at": "2026-01-01T00:00:00Z", "trace_id": "t1"}
    b = {**BASE, "sent_at": "2026-06-01T12:00:00Z", "trace_id": "t2"}
    excl = {"sent_at", "trace_id"}
    assert _hash_of(msgpack.packb(a), None, excl) == _hash_of(msgpack.packb(b), None, excl)
    # Without the exclusion they are different payloads.
    assert _hash_of(msgpack.packb(a), None) != _hash_of(msgpack.packb(b), None)
    # Excluding a field does not exclude the others.
    c = {**b, "cents": 999}
    assert _hash_of(msgpack.packb(c), None, excl) != _hash_of(msgpack.packb(a), None, excl)


class Amounts(BaseModel):
    f: float
    d: Decimal
    n: int | float = 0


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ({"f": 1, "d": 1}, {"f": 1.0, "d": 1.0}),
        ({"f": 2.0, "d": "1.50"}, {"f": 2, "d": "1.5"}),
        ({"f": 0.0, "d": "0.00"}, {"f": -0.0, "d": "-0"}),
        ({"f": 1, "d": "100", "n": 3}, {"f": 1, "d": "1E+2", "n": 3.0}),
    ],
)
def test_canonical_numbers(left, right):
    assert payload_hash(Amounts.model_validate(left)) == payload_hash(Amounts.model_validate(right))


def test_different_numbers_differ():
    a = Amounts.model_validate({"f": 1.5, "d": "1.5"})
    assert payload_hash(a) != payload_hash(Amounts.model_validate({"f": 1.25, "d": "1.5"}))
    assert payload_hash(a) != payload_hash(Amounts.model_validate({"f": 1.5, "d": "1.51"}))


def test_same_payload_json_and_msgpack_with_float_and_int_spelling():
    data_int = {"f": 3, "d": 7}
    data_float = {"f": 3.0, "d": 7.0}
    app = App("g")

    @app.handler("t", schema=Amounts, key="record")
    async def h(p: Amounts, ctx: object) -> None:
        return None

    def ident(value: bytes, ctype: str | None):
        headers = (("content-type", ctype.encode()),) if ctype else ()
        return identify(h, Message("t", 0, 0, b"k", value, headers))

    assert (
        ident(json.dumps(data_int).encode(), "application/json").hash
        == ident(msgpack.packb(data_float), None).hash
    )


class Tagged(BaseModel):
    tags: set[int]
    names: frozenset[str] = frozenset()


def test_set_order_does_not_matter():
    # 0 and 8 share a slot in a small set, so insertion order decides iteration order: a
    # set dumped as it iterates hashed differently for the same payload (and across processes
    # with different hash seeds, for sets of strings).
    a = Tagged.model_validate({"tags": [0, 8], "names": ["x", "y", "z"]})
    b = Tagged.model_validate({"tags": [8, 0], "names": ["z", "y", "x"]})
    assert list(a.tags) != list(b.tags)
    assert canonical_bytes(a) == canonical_bytes(b)
    assert payload_hash(a) == payload_hash(b)


def test_canonical_form_is_compact_sorted_json():
    class M(BaseModel):
        b: int
        a: str
        when: datetime

    m = M(b=1, a="é", when=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    # Version 1 (records made before version 2 are compared this way): sorted compact JSON.
    v1 = canonical_bytes(m, version=1)
    assert v1 == '{"a":"é","b":1,"when":"2026-01-02T03:04:05Z"}'.encode()
    assert canonical_bytes(m, {"when"}, version=1) == '{"a":"é","b":1}'.encode()
    # Version 2: sorted, compact, each value marked by kind, numbers by exact value.
    assert canonical_bytes(m) == 'm{"a":"é","b":1e0,"when":t"2026-01-02T03:04:05+00:00"}'.encode()
    assert canonical_bytes(m, {"when"}) == 'm{"a":"é","b":1e0}'.encode()


def test_hash_is_blake2b_128_hex():
    digest = payload_hash(PaymentRequested(payment_id="p", account="a", cents=1))
    assert HASH_ALG == "blake2b-128"
    assert len(digest) == 32
    int(digest, 16)
