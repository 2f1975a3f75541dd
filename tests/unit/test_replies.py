"""Replies, row by row: the content type chosen at completion, the reply topic read in either
spelling, the request's correlation headers copied back, and nothing a reply sets itself
overwritten by a copy. The real-service proof is tests/integration/test_request_reply.py."""

from __future__ import annotations

import json

import msgpack
import pytest
from pydantic import BaseModel

from consumer import App, ConfigError, Context, Message
from consumer.constants import CONTENT_JSON, CONTENT_MSGPACK
from consumer.outbox import envelopes
from consumer.runtime.decide import Known
from consumer.runtime.replies import Replies, reply_topic, reply_type
from consumer.settings import load_settings

pytestmark = pytest.mark.unit


def _msg(*headers: tuple[str, bytes]) -> Message:
    return Message("orders", 0, 7, b"k", b"{}", tuple(headers))


@pytest.mark.parametrize(
    ("content_type", "default", "expected"),
    [
        (b"application/json", CONTENT_MSGPACK, CONTENT_JSON),
        (b"application/json; charset=utf-8", CONTENT_MSGPACK, CONTENT_JSON),
        (b"JSON", CONTENT_MSGPACK, CONTENT_JSON),
        (b"application/msgpack", CONTENT_JSON, CONTENT_MSGPACK),
        (b"application/x-msgpack", CONTENT_JSON, CONTENT_MSGPACK),
        (None, CONTENT_MSGPACK, CONTENT_MSGPACK),
        (None, CONTENT_JSON, CONTENT_JSON),  # read as the decoder read it: the default
    ],
)
def test_reply_type_is_the_request_content_type(content_type, default, expected):
    headers = [("content-type", content_type)] if content_type else []
    assert reply_type(_msg(*headers), None, default) == expected


def test_the_handler_override_wins():
    msg = _msg(("content-type", b"application/json"))
    assert reply_type(msg, CONTENT_MSGPACK, CONTENT_JSON) == CONTENT_MSGPACK


def test_reply_topic_in_our_spelling_or_faststreams():
    assert reply_topic(_msg(("reply_to", b"fs"))) == "fs"
    assert reply_topic(_msg(("reply_to", b"fs"), ("reply-to", b"ours"))) == "ours"
    assert reply_topic(_msg()) is None


def test_a_reply_is_encoded_in_the_stored_type_and_carries_the_copied_headers():
    msg = _msg(
        ("content-type", b"application/msgpack"),  # a copy in another type than the first
        ("reply_to", b"answers"),
        ("correlation_id", b"fs-1"),
        ("correlation-id", b"ours-1"),
        ("x-other", b"not copied"),
    )
    k = Known("done", "h", {"b": 2, "a": 1}, has_result=True, reply_type=CONTENT_JSON)
    [row] = Replies(["orders"]).row(msg, ("g.h", "k"), k)
    h = dict(row.headers)
    assert row.topic == "answers"
    assert json.loads(row.value) == {"a": 1, "b": 2} and h["content-type"] == CONTENT_JSON
    assert h["correlation_id"] == "fs-1" and h["correlation-id"] == "ours-1"
    assert "x-other" not in h


def test_a_record_from_before_reply_types_is_answered_in_msgpack():
    msg = _msg(("content-type", b"application/json"), ("reply-to", b"answers"))
    [row] = Replies(["orders"]).row(msg, ("g.h", "k"), Known("done", "h", [1], has_result=True))
    assert (
        msgpack.unpackb(row.value) == [1] and dict(row.headers)["content-type"] == CONTENT_MSGPACK
    )


def test_a_binary_correlation_id_is_not_copied():
    msg = _msg(("reply-to", b"answers"), ("correlation-id", b"\xff\x00"))
    [row] = Replies(["orders"]).row(msg, ("g.h", "k"), Known("done", "h", 1, has_result=True))
    assert "correlation-id" not in dict(row.headers)


def test_a_copied_header_never_replaces_one_the_reply_sets():
    row = envelopes.reply(
        _msg(), "answers", "g.h", "k", "done", 1, copied=[("Content-Type", "text/evil")]
    )
    assert [v for n, v in row.headers if n.lower() == "content-type"] == [CONTENT_MSGPACK]


def test_settings_refuse_copying_a_header_the_reply_sets():
    with pytest.raises(ConfigError, match=r"CONSUMER_REPLY_COPY_HEADERS: .*content-type"):
        load_settings(require_connections=False, reply_copy_headers=["content-type"])
    ok = load_settings(require_connections=False, reply_copy_headers=["x-request-id"])
    assert ok.reply_copy_headers == ("x-request-id",)


class P(BaseModel):
    id: str


def test_an_unknown_reply_content_type_is_refused_at_registration():
    app = App("g")
    with pytest.raises(ConfigError, match="reply_content_type must be one of"):

        @app.handler("t", schema=P, reply_content_type="text/csv")
        async def h(p: P, ctx: Context) -> None: ...
