"""Canonical form version 2: every validated value the handler receives counts, and nothing
else; defaults are left out; records made under version 1 are compared under version 1."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from typing import Annotated, Any, Literal
from uuid import UUID

import msgpack
import pytest
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretBytes,
    SecretStr,
    computed_field,
    field_serializer,
    model_validator,
)

from consumer import App, Message
from consumer.dedup.hashing import (
    HASH_VERSION,
    canonical_bytes,
    marker_digest,
    parse_marker_digest,
    payload_hash,
)
from consumer.dedup.identity import identify

pytestmark = pytest.mark.unit


def _h(model: type[BaseModel], data: dict[str, Any]) -> str:
    return payload_hash(model.model_validate(data))


def _ident(schema: type[BaseModel], value: bytes, ctype: str | None = None, **opts: Any):
    app = App("g")

    @app.handler("t", schema=schema, key="record", **opts)
    async def h(p: Any, ctx: object) -> None:
        return None

    headers = (("content-type", ctype.encode()),) if ctype else ()
    return identify(h, Message("t", 0, 0, b"k", value, headers))


class Card(BaseModel):
    id: str
    card: SecretStr
    pin: SecretBytes = SecretBytes(b"")


def test_secrets_count_though_their_dump_is_masked():
    a = {"id": "1", "card": "4111111111111111", "pin": b"1234"}
    assert Card.model_validate(a).model_dump(mode="json")["card"] == "**********"  # masked
    assert _h(Card, a) != _h(Card, {**a, "card": "5500000000000004"})
    assert _h(Card, a) != _h(Card, {**a, "pin": b"9999"})
    assert _h(Card, a) == _h(Card, dict(a))
    # Revealed for hashing only: the digest, never the value, leaves the process.
    assert b"4111" in canonical_bytes(Card.model_validate(a))


class Transfer(BaseModel):
    id: str
    iban: str = Field(exclude=True)
    note: str = ""

    @field_serializer("note")
    def _mask(self, v: str) -> str:
        return "***"


def test_excluded_and_serialised_away_fields_count():
    a = {"id": "1", "iban": "DE89370400440532013000", "note": "rent"}
    assert "iban" not in Transfer.model_validate(a).model_dump()
    assert _h(Transfer, a) != _h(Transfer, {**a, "iban": "FR1420041010050500013M02606"})
    assert _h(Transfer, a) != _h(Transfer, {**a, "note": "gift"})


def test_only_hash_exclude_leaves_fields_out():
    a = {"id": "1", "iban": "DE89370400440532013000"}
    b = {"id": "1", "iban": "FR1420041010050500013M02606"}
    assert (
        _ident(Transfer, msgpack.packb(a), hash_exclude={"iban"}).hash
        == _ident(Transfer, msgpack.packb(b), hash_exclude={"iban"}).hash
    )


class Amount(BaseModel):
    amount: Decimal
    rate: float = 0.0
    count: int = 0
    extra: Any = None


def test_json_decimal_is_exact_and_hashed_exactly():
    exact = _ident(Amount, b'{"amount": 12345678901234567.89}', "application/json")
    rounded = _ident(Amount, b'{"amount": 12345678901234567.68}', "application/json")
    assert exact.payload.amount == Decimal("12345678901234567.89")
    assert exact.hash != rounded.hash
    # The same amount as a msgpack string, or a JSON string, is the same payload.
    as_text = _ident(Amount, msgpack.packb({"amount": "12345678901234567.89"}))
    assert as_text.hash == exact.hash


def test_json_numbers_keep_float_int_and_spelling_equivalence():
    a = _ident(Amount, b'{"amount": 1, "rate": 1, "count": 1.0}', "application/json")
    b = _ident(Amount, msgpack.packb({"amount": 1.0, "rate": 1.0, "count": 1}))
    c = _ident(Amount, b'{"amount": "1.00", "rate": 1.0, "count": 1}', "application/json")
    assert a.hash == b.hash == c.hash
    # A float field gets the nearest float of a long JSON number, as before.
    f = _ident(Amount, b'{"amount": 0, "rate": 12345678901234567.89}', "application/json")
    assert f.payload.rate == 12345678901234567.89 and isinstance(f.payload.rate, float)
    # Plain floats in an Any field stay floats (no Decimal where a float holds the value).
    g = _ident(Amount, b'{"amount": 0, "extra": [0.1, 1e20]}', "application/json")
    assert g.payload.extra == [0.1, 1e20] and all(type(x) is float for x in g.payload.extra)


def test_zero_signs_nan_and_infinities():
    class F(BaseModel):
        f: float

    assert _h(F, {"f": 0.0}) == _h(F, {"f": -0.0})
    assert _h(F, {"f": math.nan}) == _h(F, {"f": math.nan})
    assert len({_h(F, {"f": v}) for v in (math.nan, math.inf, -math.inf, 0.0)}) == 4


class Plain(BaseModel):
    id: str
    cents: int


class Evolved(BaseModel):
    id: str
    cents: int
    currency: str = "EUR"
    tags: list[str] = Field(default_factory=list)


def test_a_field_added_with_a_default_keeps_old_payloads_hashes():
    old = {"id": "1", "cents": 5}
    assert _h(Plain, old) == _h(Evolved, old)
    assert _h(Plain, old) == _h(Evolved, {**old, "currency": "EUR", "tags": []})
    assert _h(Evolved, old) != _h(Evolved, {**old, "currency": "USD"})


class ByCard(BaseModel):
    kind: Literal["card"] = "card"
    number: str


class ByIban(BaseModel):
    kind: Literal["iban"] = "iban"
    number: str


class Payment(BaseModel):
    method: Annotated[ByCard | ByIban, Field(discriminator="kind")]


def test_discriminated_union_members_differ():
    assert _h(Payment, {"method": {"kind": "card", "number": "1"}}) != _h(
        Payment, {"method": {"kind": "iban", "number": "1"}}
    )


class Color(Enum):
    RED = "red"


class Item(BaseModel):
    sku: str
    qty: int = 1


class Rich(BaseModel):
    model_config = ConfigDict(extra="allow")
    items: list[Item] = Field(default_factory=list)
    by_name: dict[str, Item] = Field(default_factory=dict)
    tags: set[str] = Field(default_factory=set)
    frozen: frozenset[int] = frozenset()
    pair: tuple[int, str] = (0, "")
    raw: bytes | str = ""
    color: Color | None = None
    uid: UUID | None = None
    when: datetime | None = None
    wait: timedelta | None = None
    anything: Any = None


def test_nested_values_count_and_are_stable():
    base = {
        "items": [{"sku": "a", "qty": 2}],
        "by_name": {"x": {"sku": "b"}, "y": {"sku": "c"}},
        "tags": ["p", "q", "r"],
        "frozen": [3, 1, 2],
        "pair": [1, "z"],
        "raw": b"ab",
        "color": "red",
        "uid": "12345678-1234-5678-1234-567812345678",
        "wait": 1.5,
    }
    h = _h(Rich, base)
    reordered = {
        **base,
        "by_name": {"y": {"sku": "c"}, "x": {"sku": "b"}},
        "tags": ["r", "q", "p"],
        "frozen": [2, 3, 1],
    }
    assert _h(Rich, reordered) == h
    for change in [
        {"items": [{"sku": "a", "qty": 3}]},
        {"by_name": {"x": {"sku": "b"}}},
        {"tags": ["p", "q"]},
        {"frozen": [1, 2]},
        {"pair": [2, "z"]},
        {"raw": "ab"},  # text, not bytes
        {"color": None},
        {"uid": "12345678-1234-5678-1234-567812345679"},
        {"wait": 2},
        {"surprise": "extra fields count"},
        {"anything": ["ab"]},
    ]:
        assert _h(Rich, {**base, **change}) != h, change
    # A set and a list of the same items are different values.
    assert _h(Rich, {"anything": [1, 2]}) != _h(Rich, {"anything": {1, 2}})


def test_datetimes_at_other_offsets_are_other_payloads():
    class When(BaseModel):
        at: datetime

    utc = _h(When, {"at": "2026-01-02T04:30:00Z"})
    assert utc == _h(When, {"at": "2026-01-02T04:30:00+00:00"})
    assert utc == _h(When, {"at": datetime(2026, 1, 2, 4, 30, tzinfo=UTC)})
    # The same instant at another offset: the handler can see a different local date.
    assert utc != _h(When, {"at": "2026-01-01T23:30:00-05:00"})
    assert utc != _h(When, {"at": "2026-01-02T04:30:00"})  # naive

    class Normalised(BaseModel):
        at: datetime

        @model_validator(mode="after")
        def _utc(self) -> Normalised:
            self.at = self.at.astimezone(UTC)
            return self

    # A schema that normalises to UTC makes the instant the identity.
    est = timezone(timedelta(hours=-5))
    assert _h(Normalised, {"at": datetime(2026, 1, 1, 23, 30, tzinfo=est)}) == _h(
        Normalised, {"at": "2026-01-02T04:30:00Z"}
    )


def test_validated_values_are_hashed_and_computed_fields_are_not():
    class Upper(BaseModel):
        code: str

        @model_validator(mode="after")
        def _upper(self) -> Upper:
            self.code = self.code.upper()
            return self

        @computed_field  # type: ignore[prop-decorator]
        @property
        def length(self) -> int:
            return len(self.code)

    assert _h(Upper, {"code": "abc"}) == _h(Upper, {"code": "ABC"})
    assert _h(Upper, {"code": "abc"}) != _h(Upper, {"code": "abd"})
    assert b"length" not in canonical_bytes(Upper(code="x"))


def test_aliases_hash_by_field_name():
    class Aliased(BaseModel):
        model_config = ConfigDict(populate_by_name=True)
        amount: int = Field(alias="amt")

    assert _h(Aliased, {"amt": 5}) == _h(Aliased, {"amount": 5})
    assert _h(Aliased, {"amt": 5}) != _h(Aliased, {"amt": 6})


def test_large_ints_hash_alike_from_json_and_msgpack():
    class Big(BaseModel):
        n: int

    n = 2**63 + 1
    js = _ident(Big, json.dumps({"n": n}).encode(), "application/json")
    mp = _ident(Big, msgpack.packb({"n": n}))
    assert js.hash == mp.hash
    assert js.hash != _ident(Big, msgpack.packb({"n": n + 1})).hash


# ---------------------------------------------------------------- versions


def test_a_copy_is_compared_under_its_records_version():
    value = b'{"amount": 12345678901234567.89}'
    ident = _ident(Amount, value, "application/json")
    # Version 1 read JSON numbers as floats, then hashed model_dump: reproduce its digest.
    v1_model = Amount.model_validate(json.loads(value))
    v1_digest = payload_hash(v1_model, version=1)
    assert ident.same_payload(ident.hash, HASH_VERSION) is True
    assert ident.same_payload(v1_digest, 1) is True
    assert ident.same_payload(ident.hash, 1) is False  # never across versions
    other = _ident(Amount, b'{"amount": 5}', "application/json")
    assert other.same_payload(v1_digest, 1) is False
    assert ident.same_payload(ident.hash, 99) is None  # a newer release's record


def test_marker_digest_round_trip():
    assert parse_marker_digest("ab" * 16) == ("ab" * 16, 1)  # markers of before versions
    assert parse_marker_digest(marker_digest("cd" * 16, 2)) == ("cd" * 16, 2)
    assert marker_digest("ef", 1) == "ef"
    assert parse_marker_digest("ef/vx") == ("ef", 0)


def test_fields_the_payload_did_not_set_are_not_its_identity():
    from uuid import uuid4

    class Stamped(BaseModel):
        id: str
        event_id: UUID = Field(default_factory=uuid4)
        seen_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    a, b = Stamped(id="1"), Stamped(id="1")
    assert a.event_id != b.event_id  # what the handler receives differs only by the schema
    assert payload_hash(a) == payload_hash(b)
    sent = "12345678-1234-5678-1234-567812345678"
    assert _h(Stamped, {"id": "1", "event_id": sent}) != payload_hash(a)
    assert _h(Stamped, {"id": "1", "event_id": sent}) == _h(Stamped, {"id": "1", "event_id": sent})


def test_the_text_fast_path_is_exactly_json_dumps():
    """canonical._text skips json.dumps for strings it would not escape: same bytes."""
    import json

    from hypothesis import given
    from hypothesis import strategies as st

    from consumer.dedup.canonical import _text

    @given(st.text())
    def same(s: str) -> None:
        assert _text(s) == json.dumps(s, ensure_ascii=False)

    same()
    for s in ['a"b', "a\\b", "x\ny", "\x00", "\x1f", "\x7f", "\u2028", "é€😀", "\ud800"]:
        assert _text(s) == json.dumps(s, ensure_ascii=False)


def test_the_int_fast_path_is_exactly_the_decimal_form():
    """canonical._small_int skips Decimal for ints below 10**18: the same text as _number,
    and ints past the bound still take _number."""
    from hypothesis import given
    from hypothesis import strategies as st

    from consumer.dedup.canonical import _SMALL, _encode, _number, _small_int

    @given(st.integers(min_value=-_SMALL + 1, max_value=_SMALL - 1))
    def same(n: int) -> None:
        assert _small_int(n) == _number(n)

    same()
    for n in [0, 1, -1, 10, -10, 1200, 10**17, -(10**17), _SMALL - 1, _SMALL, -_SMALL, 10**40]:
        assert _encode(n) == _number(n)


def test_the_form_of_a_typical_payload_is_pinned():
    """The canonical form of a payments payload, spelled out: a faster encoder must give
    these exact bytes, or every stored record's hash would stop matching its copies."""
    from consumer.dedup.canonical import encode_model
    from schemas.payments import PaymentRequested

    p = PaymentRequested(
        payment_id="p-1", account="acc", cents=-12300, memo='he "hi"', trace_id="t"
    )
    assert encode_model(p, {"sent_at", "trace_id"}) == (
        'm{"account":"acc","cents":-123e2,"currency":"EUR","memo":"he \\"hi\\"",'
        '"payment_id":"p-1","schema_version":1e0}'
    )
