"""msgpack and JSON decoding by content type, and the errors a person can act on."""

from __future__ import annotations

import json

import msgpack
import pytest

from consumer import DecodeError
from consumer.codec import decode, encode
from consumer.constants import CONTENT_JSON, CONTENT_MSGPACK

pytestmark = pytest.mark.unit

DATA = {"a": 1, "b": [1.5, "x", None, True], "c": {"d": "é"}}


@pytest.mark.parametrize("ctype", [None, "", CONTENT_MSGPACK, "msgpack", "application/x-msgpack"])
def test_msgpack_is_the_default(ctype):
    assert decode(msgpack.packb(DATA), ctype) == DATA


@pytest.mark.parametrize(
    "ctype",
    [CONTENT_JSON, "json", "text/json", "Application/JSON", "application/json; charset=utf-8"],
)
def test_json_by_content_type(ctype):
    assert decode(json.dumps(DATA).encode(), ctype) == DATA


def test_roundtrip_both_encodings():
    assert decode(encode(DATA), None) == DATA
    assert decode(encode(DATA, CONTENT_JSON), CONTENT_JSON) == DATA
    # Compact JSON, UTF-8 as is.
    assert encode({"k": "é", "n": 1}, CONTENT_JSON) == '{"k":"é","n":1}'.encode()


@pytest.mark.parametrize(
    ("value", "ctype", "needle"),
    [
        (None, None, "tombstone"),
        (b"\xc1", None, "msgpack"),  # a reserved msgpack byte
        (b"\x92\x01", None, "msgpack"),  # truncated array
        (b"\x01\x02", None, "msgpack"),  # extra data after a value
        (b"\xa2\xff\xfe", None, "msgpack"),  # a str that is not UTF-8
        (b"{nope", CONTENT_JSON, "JSON"),
        (b"\xff\xfe", CONTENT_JSON, "JSON"),
        (b"{}", "text/plain", "content-type"),
    ],
)
def test_undecodable(value, ctype, needle):
    with pytest.raises(DecodeError) as exc:
        decode(value, ctype)
    assert exc.value.reason == "undecodable"
    assert needle in str(exc.value)


def test_msgpack_binary_and_json_text_decode_to_what_the_schema_validates():
    # msgpack bin stays bytes; JSON strings are text. The schema decides what is valid.
    assert decode(msgpack.packb({"b": b"\x00\x01"}, use_bin_type=True), None) == {"b": b"\x00\x01"}


def test_json_numbers_are_decoded_exactly():
    from decimal import Decimal

    out = decode(
        b'{"exact": 12345678901234567.89, "f": 1.5, "tenth": 0.1, "e": 1e20, "i": 7,'
        b' "neg0": -0.0, "huge": 1e400, "absurd": 1e999999999}',
        CONTENT_JSON,
    )
    # Only a number a float cannot hold is a Decimal; the rest are what they were.
    assert out["exact"] == Decimal("12345678901234567.89")
    assert [type(out[k]) for k in ("f", "tenth", "e", "neg0", "i")] == [float] * 4 + [int]
    assert str(out["neg0"]) == "-0.0"
    assert out["huge"] == Decimal("1e400")
    # An exponent no schema needs stays a float: no billion-digit integers from 11 bytes.
    assert out["absurd"] == float("inf")
    # The version-1 reading, kept to recompute version-1 hashes: floats throughout.
    assert decode(b'{"x": 12345678901234567.89}', CONTENT_JSON, exact=False) == {
        "x": 12345678901234567.89
    }
