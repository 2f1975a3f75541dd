"""The Protobuf codec, with tests/unit/protos/payments_pb2.py (generated, checked in)."""

from __future__ import annotations

import pytest

from consumer.codecs.protobuf import ProtobufCodec
from tests.unit.codec_models import ORDERS, PAYMENTS, Order, Payment
from tests.unit.protos import payments_pb2

pytestmark = pytest.mark.unit

CODEC = ProtobufCodec({Payment: payments_pb2.Payment, Order: payments_pb2.Order})


@pytest.mark.parametrize("value", PAYMENTS + ORDERS, ids=lambda v: type(v).__name__)
def test_round_trip(value):
    model = type(value)
    assert model.model_validate(CODEC.decode(CODEC.encode(value, model), model)) == value


def test_what_protobuf_reads_is_what_was_written():
    data = CODEC.encode(PAYMENTS[0], Payment)
    msg = payments_pb2.Payment.FromString(data)
    assert (msg.amount, msg.kind, msg.raw) == ("12.50", payments_pb2.bank, b"\x00ab\x10")
    assert msg.at.ToDatetime().isoformat() == "2024-05-01T12:30:15.123456"
    assert [(line.sku, line.qty) for line in msg.lines] == [("s-1", 2), ("s-2", 0)]


def test_zero_values_are_present_so_a_required_zero_validates():
    data = payments_pb2.Order(order_id="o", qty=0, total="1").SerializeToString()
    assert Order.model_validate(CODEC.decode(data, Order)).qty == 0


def test_unknown_fields_are_ignored():
    # An Order read as if it were a Line-shaped message with fewer fields: field 3 unknown.
    data = payments_pb2.Order(order_id="o", qty=2, total="9").SerializeToString()
    assert Order.model_validate(CODEC.decode(data, Order)).total == 9


@pytest.mark.parametrize("garbage", [b"\xff", b"\x0a\x05ab", b"\x07", b"\x12\xff\xff\xff\xff\x0f"])
def test_garbage_does_not_parse(garbage):
    with pytest.raises(Exception):  # noqa: B017 - the registry reports any error as undecodable
        CODEC.decode(garbage, Order)


def test_a_model_without_a_message_class_is_named():
    from pydantic import BaseModel

    class Other(BaseModel):
        x: int

    with pytest.raises(LookupError, match="no protobuf message class for Other"):
        CODEC.decode(b"", Other)
