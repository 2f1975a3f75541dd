"""The payload hash is the validated model's: one payload sent as JSON, msgpack, Avro or
Protobuf gives one digest (and one identity through the registry an app uses)."""

from __future__ import annotations

import json

import msgpack
import pytest
from pydantic import BaseModel

from consumer import App
from consumer.codecs.avro import AvroCodec
from consumer.codecs.protobuf import ProtobufCodec
from consumer.dedup.hashing import payload_hash
from consumer.dedup.identity import identify
from consumer.message import Message
from tests.unit.codec_models import ORDERS, PAYMENTS, Order, Payment
from tests.unit.protos import payments_pb2

pytestmark = pytest.mark.unit

AVRO = AvroCodec()
PROTO = ProtobufCodec({Payment: payments_pb2.Payment, Order: payments_pb2.Order})


def _as_json(value: BaseModel) -> bytes:
    return value.model_dump_json().encode()


def _as_msgpack(value: BaseModel) -> bytes:
    # What a msgpack producer sends: JSON-mode data, bytes as bin.
    data = value.model_dump(mode="json")
    if isinstance(value, Payment):
        data["raw"] = value.raw
    return msgpack.packb(data, use_bin_type=True)


ENCODINGS = {
    "application/json": _as_json,
    "application/msgpack": _as_msgpack,
    "application/avro": lambda v: AVRO.encode(v, type(v)),
    "application/x-protobuf": lambda v: PROTO.encode(v, type(v)),
}


def _app(model: type[BaseModel]) -> App:
    app = App("codec-hash")
    app.codec("application/avro", AVRO)
    app.codec("application/x-protobuf", PROTO)
    app.handler("t", schema=model, key="record")(lambda p, ctx: None)
    return app


@pytest.mark.parametrize("value", PAYMENTS + ORDERS, ids=lambda v: f"{type(v).__name__}")
def test_one_payload_one_hash_in_every_codec(value):
    model = type(value)
    app = _app(model)
    handler = app.handler_for("t")
    assert handler is not None
    digests = {}
    for ctype, enc in ENCODINGS.items():
        msg = Message("t", 0, 0, b"k", enc(value), (("content-type", ctype.encode()),))
        ident = identify(handler, msg, "tenant", "application/msgpack", app.codecs)
        assert ident.payload == value, ctype
        digests[ctype] = ident.hash
    assert set(digests.values()) == {payload_hash(value)}, digests


def test_the_payments_differ_from_each_other():
    # The test above would pass for a hash that ignored its input: it does not.
    assert len({payload_hash(v) for v in PAYMENTS + ORDERS}) == len(PAYMENTS + ORDERS)


def test_a_json_amount_with_more_zeros_hashes_like_avros_fixed_scale():
    # Avro's decimal has a fixed scale (12.5 travels as 12.50); the canonical form reads the
    # value, so JSON's 12.5 is the same payload.
    raw = json.loads(_as_json(PAYMENTS[0]))
    raw["amount"] = "12.5"
    assert payload_hash(Payment.model_validate(raw)) == payload_hash(PAYMENTS[0])
