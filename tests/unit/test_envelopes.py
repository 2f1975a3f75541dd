"""Outgoing rows: dead letters keep the original bytes, conflicts carry both hashes, replies
and published messages carry idempotency keys derived from their source."""

from __future__ import annotations

import json

import msgpack
import pytest
from pydantic import BaseModel

from consumer import Context, Message
from consumer.codec import decode
from consumer.context import Outgoing
from consumer.outbox import envelopes

pytestmark = pytest.mark.unit

MSG = Message(
    "pay",
    2,
    41,
    b"rec-key",
    b"\x81\xa1a\x01",
    (("idempotency-key", b"k1"), ("traceparent", b"00-abc-def-01"), ("x-custom", b"v")),
)


def _h(row) -> dict[str, str]:
    return dict(row.headers)


def test_dead_letter_keeps_original_bytes_and_names_the_reason():
    row = envelopes.dead_letter(MSG, "rejected", "amount must be positive", "g.settle", "k1")
    assert row.topic == "pay.dlq"
    assert row.value == MSG.value and row.key == MSG.key
    h = _h(row)
    assert h["x-reason"] == "rejected"
    assert h["x-detail"] == "amount must be positive"
    assert h["x-namespace"] == "g.settle"
    assert h["x-idempotency-key"] == "k1"
    assert h["x-source"] == "pay/2/41"
    assert h["x-custom"] == "v" and h["traceparent"] == "00-abc-def-01"
    # The original idempotency key would make a consumer of the DLQ treat it as the request.
    assert h["idempotency-key"] == "dlq:pay/2/41" == row.idempotency_key
    assert [n for n, _ in row.headers].count("idempotency-key") == 1
    assert h["content-type"] == "application/msgpack"


def test_dead_letter_of_a_tombstone_and_of_binary_headers():
    odd = Message(
        "t", 0, 1, None, None, (("bin", b"\xff\x00"), ("nul", b"a\x00b"), ("n\x00", b"x"))
    )
    row = envelopes.dead_letter(odd, "undecodable", "no\x00value")
    assert row.value == b""
    h = _h(row)
    assert h["bin.hex"] == "ff00"
    assert h["nul.hex"] == "610062"  # jsonb cannot hold NUL: kept as hex, not dropped
    assert h["n\\x00"] == "x"
    assert h["x-detail"] == "no\\x00value"
    assert all("\x00" not in n + v for n, v in row.headers)
    json.dumps(row.headers)


def test_conflict_carries_both_hashes_and_not_the_stored_result():
    row = envelopes.conflict(MSG, "g.settle", "k1", "aaaa", "bbbb")
    assert row.topic == "pay.conflicts"
    assert row.value == MSG.value
    h = _h(row)
    assert (h["x-reason"], h["x-payload-hash"], h["x-stored-hash"]) == ("conflict", "aaaa", "bbbb")
    assert (h["x-namespace"], h["x-idempotency-key"]) == ("g.settle", "k1")
    assert h["idempotency-key"] == "conflict:pay/2/41"


def test_reply_has_the_same_idempotency_key_for_every_copy():
    first = envelopes.reply(MSG, "replies", "g.settle", "k1", "done", {"ok": 1})
    again = envelopes.reply(
        Message("pay", 0, 99, None, b"", ()), "replies", "g.settle", "k1", "done", {"ok": 1}
    )
    assert first.topic == "replies"
    assert first.idempotency_key == again.idempotency_key == "reply:g.settle:k1"
    assert decode(first.value, None) == {"ok": 1}
    assert _h(first)["x-outcome"] == "done"
    assert _h(first)["traceparent"] == "00-abc-def-01"


def test_published_rows_have_indexed_idempotency_keys():
    items = [Outgoing("out", b"a", b"1", (("h", "v"),)), Outgoing("out", None, b"2", ())]
    rows = envelopes.published(MSG, "g.settle", "k1", items)
    assert [r.idempotency_key for r in rows] == ["g.settle:k1:0", "g.settle:k1:1"]
    assert _h(rows[0])["idempotency-key"] == "g.settle:k1:0"
    assert _h(rows[0])["h"] == "v"
    assert _h(rows[1])["x-source"] == "pay/2/41"


def test_published_header_with_nul_is_the_handlers_error():
    with pytest.raises(ValueError, match="NUL"):
        envelopes.published(MSG, "ns", "k", [Outgoing("out", None, b"", (("h", "a\x00"),))])


class Receipt(BaseModel):
    id: str
    cents: int


def _ctx() -> Context:
    return Context(db=None, namespace="ns", idempotency_key="k", message=MSG, payload_hash="h")  # type: ignore[arg-type]


def test_publish_encodes_msgpack_by_default_and_json_on_request():
    ctx = _ctx()
    ctx.publish("out", Receipt(id="r", cents=5), key="acc")
    ctx.publish("out", {"a": 1}, key=b"raw", headers={"x": "y"}, content_type="application/json")
    first, second = ctx.outgoing
    assert first.key == b"acc"
    assert msgpack.unpackb(first.value) == {"id": "r", "cents": 5}
    assert dict(first.headers)["content-type"] == "application/msgpack"
    assert second.key == b"raw"
    assert json.loads(second.value) == {"a": 1}
    assert dict(second.headers) == {"x": "y", "content-type": "application/json"}


def test_publish_refuses_unknown_content_types():
    with pytest.raises(ValueError, match="content_type"):
        _ctx().publish("out", {"a": 1}, content_type="text/csv")
