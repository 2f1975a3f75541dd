"""Identity rules: where the key comes from, what makes it invalid, and the namespace."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from pydantic import BaseModel, field_validator

from consumer import App, BadKey, DecodeError, InvalidMessage, Message, MissingKey, SchemaError
from consumer.dedup.identity import identify

pytestmark = pytest.mark.unit


class Pay(BaseModel):
    id: Any = "p"
    cents: int = 1
    note: str = ""


def _handler(key: Any = None, **kwargs: Any):
    app = App("grp")

    @app.handler("t", schema=Pay, key=key, **kwargs)
    async def settle(p: Pay, ctx: object) -> None:
        return None

    return settle


def _msg(
    payload: Any = None,
    headers: tuple[tuple[str, bytes], ...] = (),
    key: bytes | None = None,
    value: bytes | None = None,
) -> Message:
    raw = value if value is not None else msgpack.packb(payload or {"id": "p"})
    return Message("t", 0, 7, key, raw, headers)


def _reason(exc_info: pytest.ExceptionInfo[InvalidMessage]) -> str:
    return exc_info.value.reason


# ---------------------------------------------------------------- header key (the default)


def test_header_key_is_the_default():
    ident = identify(_handler(), _msg(headers=(("idempotency-key", b"abc"),)))
    assert (ident.namespace, ident.key) == ("grp.settle", "abc")


def test_header_lookup_is_case_insensitive_and_custom_name_works():
    assert identify(_handler(), _msg(headers=(("Idempotency-Key", b"k1"),))).key == "k1"
    h = _handler(key_header="x-request-id")
    assert identify(h, _msg(headers=(("x-request-id", b"r9"),))).key == "r9"
    with pytest.raises(MissingKey):
        identify(h, _msg(headers=(("idempotency-key", b"k1"),)))


def test_missing_header_key():
    with pytest.raises(MissingKey) as exc:
        identify(_handler(), _msg())
    assert _reason(exc) == "missing_key"


def test_empty_header_key_is_missing():
    with pytest.raises(MissingKey) as exc:
        identify(_handler(), _msg(headers=(("idempotency-key", b""),)))
    assert _reason(exc) == "missing_key"


def test_key_of_256_bytes_is_accepted_257_refused():
    assert identify(_handler(), _msg(headers=(("idempotency-key", b"k" * 256),))).key == "k" * 256
    # Bytes, not characters: 128 two-byte characters are 256 bytes.
    two_byte = ("é" * 128).encode()
    assert identify(_handler(), _msg(headers=(("idempotency-key", two_byte),))).key == "é" * 128
    for too_long in (b"k" * 257, ("é" * 128 + "x").encode()):
        with pytest.raises(BadKey) as exc:
            identify(_handler(), _msg(headers=(("idempotency-key", too_long),)))
        assert _reason(exc) == "bad_key"


def test_non_utf8_key_is_refused():
    with pytest.raises(BadKey) as exc:
        identify(_handler(), _msg(headers=(("idempotency-key", b"\xff\xfe"),)))
    assert "UTF-8" in str(exc.value)


def test_nul_in_key_is_refused():
    # PostgreSQL text cannot hold NUL: accepting it would make the inbox insert fail forever.
    with pytest.raises(BadKey):
        identify(_handler(), _msg(headers=(("idempotency-key", b"a\x00b"),)))


# ---------------------------------------------------------------- record key


def test_record_key():
    assert identify(_handler("record"), _msg(key=b"rk-1")).key == "rk-1"
    with pytest.raises(MissingKey):
        identify(_handler("record"), _msg(key=None))
    with pytest.raises(MissingKey):
        identify(_handler("record"), _msg(key=b""))
    with pytest.raises(BadKey):
        identify(_handler("record"), _msg(key=b"\xc3\x28"))
    with pytest.raises(BadKey):
        identify(_handler("record"), _msg(key=b"r" * 257))


def test_record_key_ignores_the_header():
    m = _msg(key=b"from-record", headers=(("idempotency-key", b"from-header"),))
    assert identify(_handler("record"), m).key == "from-record"


# ---------------------------------------------------------------- payload key


def test_payload_key_function():
    h = _handler(lambda p: p.id)
    assert identify(h, _msg({"id": "pay-1"})).key == "pay-1"
    assert identify(h, _msg({"id": 42})).key == "42"
    with pytest.raises(MissingKey):
        identify(h, _msg({"id": None}))
    with pytest.raises(MissingKey):
        identify(h, _msg({"id": ""}))
    with pytest.raises(BadKey):
        identify(h, _msg({"id": True}))
    with pytest.raises(BadKey):
        identify(h, _msg({"id": [1]}))
    with pytest.raises(BadKey):
        identify(h, _msg({"id": "x" * 257}))


def test_payload_key_function_that_raises_is_a_bad_key():
    with pytest.raises(BadKey) as exc:
        identify(_handler(lambda p: p.missing_attribute), _msg({"id": "a"}))
    assert "AttributeError" in str(exc.value)


def test_lone_surrogate_key_is_refused():
    # JSON can carry "\ud800", which is a str in Python but not encodable text.
    raw = b'{"id": "\\ud800"}'
    with pytest.raises(BadKey):
        identify(_handler(lambda p: p.id), _msg(value=raw, headers=(("content-type", b"json"),)))


def test_lone_surrogate_elsewhere_in_payload_is_undecodable():
    raw = b'{"id": "k", "note": "\\udc00"}'
    with pytest.raises(DecodeError) as exc:
        identify(_handler(lambda p: p.id), _msg(value=raw, headers=(("content-type", b"json"),)))
    assert _reason(exc) == "undecodable"


# ---------------------------------------------------------------- payload validity


def test_undecodable_and_invalid_payloads():
    with pytest.raises(DecodeError) as d:
        identify(_handler(), _msg(value=b"\xc1", headers=(("idempotency-key", b"k"),)))
    assert _reason(d) == "undecodable"
    with pytest.raises(SchemaError) as s:
        identify(_handler(), _msg({"id": "x", "cents": "lots"}, (("idempotency-key", b"k"),)))
    assert _reason(s) == "invalid_schema"
    assert "cents" in str(s.value)


def test_payload_is_validated_before_the_key_is_read():
    # An invalid payload is reported as such even when the key is missing too.
    with pytest.raises(SchemaError):
        identify(_handler(), _msg({"cents": "lots"}))


def test_validator_errors_become_schema_errors():
    class Strict(BaseModel):
        id: str

        @field_validator("id")
        @classmethod
        def no_spaces(cls, v: str) -> str:
            if " " in v:
                raise ValueError("no spaces")
            return v

    app = App("g")

    @app.handler("t", schema=Strict, key=lambda p: p.id)
    async def h(p: Strict, ctx: object) -> None:
        return None

    with pytest.raises(SchemaError):
        identify(h, Message("t", 0, 0, None, msgpack.packb({"id": "a b"})))


def test_json_and_msgpack_give_the_same_identity():
    h = _handler(lambda p: p.id)
    a = identify(h, _msg({"id": "p", "cents": 5}))
    b = identify(
        h,
        _msg(
            value=json.dumps({"cents": 5, "id": "p"}).encode(),
            headers=(("content-type", b"application/json"),),
        ),
    )
    assert (a.namespace, a.key, a.hash) == (b.namespace, b.key, b.hash)
    assert a.payload == b.payload


# ---------------------------------------------------------------- namespace and tenants


def test_namespace_is_group_and_function_or_the_given_name():
    assert identify(_handler(lambda p: p.id), _msg()).namespace == "grp.settle"
    assert identify(_handler(lambda p: p.id, name="ledger"), _msg()).namespace == "ledger"


def test_tenant_header_joins_the_namespace():
    h = _handler(lambda p: p.id)
    a = identify(h, _msg(headers=(("tenant", b"acme"),)))
    b = identify(h, _msg(headers=(("tenant", b"globex"),)))
    assert a.namespace == "grp.settle@acme"
    assert b.namespace == "grp.settle@globex"
    assert a.key == b.key  # same key, two key spaces
    assert identify(h, _msg(headers=(("tenant", b""),))).namespace == "grp.settle"


def test_tenant_header_name_is_a_setting():
    h = _handler(lambda p: p.id)
    m = _msg(headers=(("x-org", b"acme"), ("tenant", b"other")))
    assert identify(h, m, tenant_header="x-org").namespace == "grp.settle@acme"
    assert identify(h, m, tenant_header="").namespace == "grp.settle"


@pytest.mark.parametrize("tenant", [b"\xff", b"a\x00", b"t" * 257, b"a}:b", b"{x}"])
def test_bad_tenant_is_refused(tenant: bytes):
    # Braces: the namespace is a Redis hash tag, and "a}:b" + key "c" would share a Redis key
    # with tenant "a" + key "b}:c".
    with pytest.raises(BadKey):
        identify(_handler(lambda p: p.id), _msg(headers=(("tenant", tenant),)))
