"""The pydantic -> Avro schema mapper and the Avro codec (fastavro, schemaless binary)."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from decimal import Decimal
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from consumer import ConfigError
from consumer.codecs.avro import AvroCodec
from consumer.codecs.avro_schema import avro_schema
from tests.unit.codec_models import ORDERS, PAYMENTS, Order, Payment

pytestmark = pytest.mark.unit


class Color(enum.Enum):
    red = "red"
    blue = "blue"


class Level(enum.Enum):
    low = 1
    high = 2


class Inner(BaseModel):
    v: int


class Everything(BaseModel):
    s: str
    i: int
    f: float
    b: bool
    raw: bytes
    d: Decimal = Field(max_digits=10, decimal_places=3)
    ts: dt.datetime
    day: dt.date
    u: uuid.UUID
    color: Color
    level: Level
    lit: Literal["a", "b"]
    maybe: str | None = None
    either: int | str
    xs: list[int]
    ys: tuple[str, ...]
    m: dict[str, float]
    inner: Inner
    inners: list[Inner]
    amount: Decimal = Field(alias="amt", decimal_places=2)


def _fields(model: type[BaseModel]) -> dict[str, object]:
    return {f["name"]: f for f in avro_schema(model)["fields"]}


def test_the_mapper_covers_the_common_types():
    f = _fields(Everything)
    assert [f[n]["type"] for n in ("s", "i", "f", "b", "raw")] == [
        "string",
        "long",
        "double",
        "boolean",
        "bytes",
    ]
    assert f["d"]["type"] == {
        "type": "bytes",
        "logicalType": "decimal",
        "precision": 10,
        "scale": 3,
    }
    assert f["amt"]["type"]["scale"] == 2 and f["amt"]["type"]["precision"] == 38  # the alias
    assert f["ts"]["type"] == {"type": "long", "logicalType": "timestamp-micros"}
    assert f["day"]["type"] == {"type": "int", "logicalType": "date"}
    assert f["u"]["type"] == {"type": "string", "logicalType": "uuid"}
    assert f["color"]["type"] == {"type": "enum", "name": "Color", "symbols": ["red", "blue"]}
    assert f["level"]["type"] == "long"  # an int enum: its values
    assert f["lit"]["type"] == "string"
    assert f["maybe"] == {"name": "maybe", "type": ["null", "string"], "default": None}
    assert f["either"]["type"] == ["long", "string"]
    assert f["xs"]["type"] == {"type": "array", "items": "long"}
    assert f["ys"]["type"] == {"type": "array", "items": "string"}
    assert f["m"]["type"] == {"type": "map", "values": "double"}
    assert f["inner"]["type"] == {
        "type": "record",
        "name": "Inner",
        "fields": [{"name": "v", "type": "long"}],
    }
    assert f["inners"]["type"] == {"type": "array", "items": "Inner"}  # the name, once defined


def test_every_type_round_trips_through_fastavro():
    value = Everything(
        s="é",
        i=-3,
        f=1.5,
        b=True,
        raw=b"\x00\x01",
        d=Decimal("1.250"),
        ts=dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC),
        day=dt.date(2024, 1, 2),
        u=uuid.UUID(int=9),
        color=Color.blue,
        level=Level.high,
        lit="b",
        either="x",
        xs=[1, 2],
        ys=("p",),
        m={"k": 0.5},
        inner=Inner(v=1),
        inners=[Inner(v=2)],
        amt=Decimal("3.10"),
    )
    codec = AvroCodec()
    back = Everything.model_validate(codec.decode(codec.encode(value, Everything), Everything))
    assert back == value


@pytest.mark.parametrize(
    ("annotation", "needle"),
    [
        (Decimal, "decimal_places"),
        (dict[int, str], "text keys"),
        (tuple[int, str], "tuple"),
        (object, "no Avro mapping"),
    ],
)
def test_what_cannot_be_mapped_is_a_config_error_naming_the_field(annotation, needle):
    from pydantic import create_model

    model = create_model("Bad", x=(annotation, ...))
    with pytest.raises(ConfigError, match=needle) as exc:
        avro_schema(model)
    assert "Bad.x" in str(exc.value)


@pytest.mark.parametrize("value", PAYMENTS + ORDERS, ids=lambda v: type(v).__name__)
def test_round_trip(value):
    codec = AvroCodec()
    model = type(value)
    assert model.model_validate(codec.decode(codec.encode(value, model), model)) == value


def test_an_explicit_schema_wins():
    schema = {
        "type": "record",
        "name": "Order",
        "fields": [
            {"name": "order_id", "type": "string"},
            {"name": "qty", "type": "int"},  # int, not the derived long
            {"name": "total", "type": {"type": "string"}},
        ],
    }
    codec = AvroCodec(schemas={Order: schema})
    data = codec.encode({"order_id": "o", "qty": 1, "total": "2.5"}, Order)
    assert Order.model_validate(codec.decode(data, Order)) == Order(order_id="o", qty=1, total=2.5)


def test_confluent_framing_is_written_and_required():
    framed = AvroCodec(schema_ids={Order: 42})
    data = framed.encode(ORDERS[0], Order)
    assert data[:5] == b"\x00\x00\x00\x00\x2a"
    assert data[5:] == AvroCodec().encode(ORDERS[0], Order)
    assert Order.model_validate(framed.decode(data, Order)) == ORDERS[0]
    with pytest.raises(ValueError, match="schema id 42, this codec reads 7"):
        AvroCodec(schema_ids={Order: 7}).decode(data, Order)
    with pytest.raises(ValueError, match="no Confluent framing"):
        framed.decode(data[5:], Order)


@pytest.mark.parametrize(
    "garbage", [b"", b"\x02", b"\x0a\x01", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"]
)
def test_garbage_does_not_decode(garbage):
    with pytest.raises(Exception):  # noqa: B017 - the registry reports any error as undecodable
        AvroCodec().decode(garbage, Order)


def test_trailing_bytes_do_not_decode():
    data = AvroCodec().encode(ORDERS[0], Order) + b"\x00"
    with pytest.raises(ValueError, match="1 bytes after the Avro datum"):
        AvroCodec().decode(data, Order)


def test_encoding_needs_a_model():
    with pytest.raises(ValueError, match="pydantic model"):
        AvroCodec().encode({"order_id": "o"}, None)


def test_payment_schema_is_stable():
    assert [f["name"] for f in avro_schema(Payment)["fields"]] == list(Payment.model_fields)
