"""Avro and Protobuf topics against the real broker and PostgreSQL: good records applied,
garbage and an unknown content type dead-lettered as ``undecodable`` with the partition moving
on, and ``ctx.publish(content_type="application/avro")`` encoded by the app's codec."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.alias_generators import to_camel

from consumer import App, Context
from consumer.codecs.avro import AvroCodec
from consumer.codecs.protobuf import ProtobufCodec
from tests.conftest import app_settings, header_map, read_topic, running
from tests.integration.dedup_support import cleanup, send, wait_offset
from tests.unit.codec_models import Order
from tests.unit.protos import payments_pb2

pytestmark = pytest.mark.integration

EFFECTS = "CREATE TABLE IF NOT EXISTS test_codecs_effects (k text NOT NULL, total numeric)"
AVRO, PROTO = "application/avro", "application/x-protobuf"


async def test_avro_and_protobuf_topics_apply_good_records_and_dead_letter_garbage(
    settings, topics, producer, pg, unique
):
    avro_topic = await topics("codec-avro", partitions=1, extra=("codec-out",))
    proto_topic = await topics("codec-proto", partitions=1)
    out_topic = f"codec-out-{unique}"
    group = f"g-{unique}"
    await pg.execute(EFFECTS)
    avro = AvroCodec()
    app = App(group, settings=app_settings(settings, relay_enabled=True))
    app.codec(AVRO, avro)
    app.codec(PROTO, ProtobufCodec({Order: payments_pb2.Order}))

    @app.handler(avro_topic, schema=Order, key=lambda o: o.order_id, name="avro-orders")
    async def from_avro(o: Order, ctx: Context) -> None:
        await ctx.db.execute("INSERT INTO test_codecs_effects VALUES ($1, $2)", o.order_id, o.total)
        ctx.publish(out_topic, o.model_copy(update={"qty": o.qty * 10}), content_type=AVRO)

    @app.handler(proto_topic, schema=Order, key=lambda o: o.order_id, name="proto-orders")
    async def from_proto(o: Order, ctx: Context) -> None:
        await ctx.db.execute("INSERT INTO test_codecs_effects VALUES ($1, $2)", o.order_id, o.total)

    def order(name: str) -> Order:
        return Order(order_id=f"{name}-{unique}", qty=2, total=Decimal("1.25"))

    ct_avro = {"content-type": b"application/avro"}
    ct_proto = {"content-type": b"application/x-protobuf; proto=dedup_test.Order"}
    try:
        await send(producer, avro_topic, value=avro.encode(order("a0"), Order), headers=ct_avro)
        await send(producer, avro_topic, value=b"\x0a\x01garbage", headers=ct_avro)  # offset 1
        await send(
            producer, avro_topic, value=b"a,b", headers={"content-type": b"text/csv"}
        )  # offset 2
        await send(producer, avro_topic, value=avro.encode(order("a3"), Order), headers=ct_avro)
        pb = payments_pb2.Order(order_id=f"p0-{unique}", qty=2, total="1.25")
        await send(producer, proto_topic, value=pb.SerializeToString(), headers=ct_proto)
        await send(producer, proto_topic, value=b"\x07\xff\xff", headers=ct_proto)  # offset 1
        pb.order_id = f"p2-{unique}"
        await send(producer, proto_topic, value=pb.SerializeToString(), headers=ct_proto)
        async with running(app):
            await wait_offset(pg, group, avro_topic, 0, 4)
            await wait_offset(pg, group, proto_topic, 0, 3)
            avro_dead = await read_topic(settings, avro_topic + ".dlq", expect=2)
            proto_dead = await read_topic(settings, proto_topic + ".dlq", expect=1)
            out = await read_topic(settings, out_topic, expect=2)
        rows = await pg.fetch(
            "SELECT k, total FROM test_codecs_effects WHERE k LIKE $1", f"%{unique}"
        )
        assert sorted((r[0], r[1]) for r in rows) == sorted(
            (f"{k}-{unique}", Decimal("1.25")) for k in ("a0", "a3", "p0", "p2")
        )
        details = {header_map(d)["x-source"]: header_map(d) for d in avro_dead + proto_dead}
        assert {s: h["x-reason"] for s, h in details.items()} == {
            f"{avro_topic}/0/1": "undecodable",
            f"{avro_topic}/0/2": "undecodable",
            f"{proto_topic}/0/1": "undecodable",
        }
        assert details[f"{avro_topic}/0/1"]["x-detail"].startswith("not valid application/avro")
        assert details[f"{avro_topic}/0/2"]["x-detail"].startswith(
            "unknown content type: content-type 'text/csv'"
        )
        assert details[f"{proto_topic}/0/1"]["x-detail"].startswith(
            "not valid application/x-protobuf"
        )
        # The dead letters carry the original bytes.
        assert sorted(d.value for d in avro_dead) == [b"\x0a\x01garbage", b"a,b"]
        assert proto_dead[0].value == b"\x07\xff\xff"
        # Published as Avro by the app's codec, with its content type.
        assert {header_map(r)["content-type"] for r in out} == {AVRO}
        published = [Order.model_validate(avro.decode(r.value, Order)) for r in out]
        assert sorted((o.order_id, o.qty) for o in published) == [
            (f"a0-{unique}", 20),
            (f"a3-{unique}", 20),
        ]
    finally:
        await pg.execute("DELETE FROM test_codecs_effects WHERE k LIKE $1", f"%{unique}")
        await cleanup(pg, unique)


class Settled(BaseModel):
    order_id: str
    total: Decimal  # no decimal_places: the Avro codec cannot map it (a ConfigError)


async def test_a_publish_the_codec_refuses_for_its_model_is_the_handlers_bug_not_a_burned_key(
    settings, topics, producer, pg, unique
):
    # ctx.publish(content_type=avro) of a model the codec cannot map raises the codec's
    # ConfigError inside the handler. That is the app's bug, like any other: under the
    # default on_error="retry" it is retried, then dead-lettered `failed` with nothing
    # recorded, so the fixed app's replay still applies the key. It was classified as
    # definite: recorded `rejected` at the first run, the key burned for good.
    topic = await topics("codec-bug", partitions=1, extra=("codec-bug-out",))
    group = f"g-{unique}"
    app = App(group, settings=app_settings(settings, max_attempts=2, retry_backoff_ms=1))
    app.codec(AVRO, AvroCodec())

    @app.handler(topic, schema=Order, key=lambda o: o.order_id, name=f"settle-{unique}")
    async def settle(o: Order, ctx: Context) -> None:
        ctx.publish(
            f"codec-bug-out-{unique}",
            Settled(order_id=o.order_id, total=o.total),
            content_type=AVRO,
        )

    try:
        await send(producer, topic, {"order_id": f"o-{unique}", "qty": 1, "total": "2.50"})
        async with running(app):
            await wait_offset(pg, group, topic, 0, 1)
            [dead] = await read_topic(settings, topic + ".dlq", expect=1)
        recorded = await pg.fetch(
            "SELECT status FROM dedup.inbox WHERE namespace = $1", f"settle-{unique}"
        )
        assert [r["status"] for r in recorded] == []  # the key is free for the replay
        assert header_map(dead)["x-reason"] == "failed"
        assert "ConfigError" in header_map(dead)["x-detail"]
    finally:
        await cleanup(pg, unique)


class Priced(BaseModel):
    order_id: str
    cents: int = Field(alias="amountCents")  # the wire name, as a camelCase producer has it


async def test_a_published_model_with_aliases_is_read_back_by_its_own_schema(
    settings, topics, producer, pg, unique
):
    # ctx.publish (and consumer.Outbox, the Requester) sent a model as model_dump(mode=
    # "json"): by field name, while the model validates by alias (as the Avro and Protobuf
    # codecs already write it). A consumer with the same schema, this framework's own, then
    # dead-lettered every such event as invalid_schema ("amountCents: Field required").
    src = await topics("alias-src", partitions=1, extra=("alias-out",))
    out = f"alias-out-{unique}"
    group = f"g-{unique}"
    table = f"alias_{unique}"
    await pg.execute(f"CREATE TABLE {table} (k text, cents int)")
    app = App(group, settings=app_settings(settings))

    @app.handler(src, schema=Order, key=lambda o: o.order_id, name=f"price-{unique}")
    async def price(o: Order, ctx: Context) -> None:
        for ct in ("application/json", "application/msgpack"):
            ctx.publish(
                out,
                Priced(order_id=f"{o.order_id}-{ct[12:]}", amountCents=o.qty * 100),
                content_type=ct,
            )

    @app.handler(out, schema=Priced, key=lambda p: p.order_id, name=f"book-{unique}")
    async def book(p: Priced, ctx: Context) -> None:
        await ctx.db.execute(f"INSERT INTO {table} VALUES ($1, $2)", p.order_id, p.cents)

    try:
        await send(producer, src, {"order_id": "o", "qty": 3, "total": "1"})
        async with running(app):
            await wait_offset(pg, group, out, 0, 2)
        booked = sorted((r["k"], r["cents"]) for r in await pg.fetch(f"SELECT * FROM {table}"))
        dead = await pg.fetchval("SELECT count(*) FROM dedup.outbox WHERE topic = $1", out + ".dlq")
        assert (booked, dead) == ([("o-json", 300), ("o-msgpack", 300)], 0)
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {table}")
        await cleanup(pg, unique)


class Address(BaseModel):  # billing's
    street: str


# Another module's class of the same name (shipping's), with a field the first does not have.
ShippingAddress = create_model(
    "Address", __module__="shipping", street=(str, ...), instructions=(str, "")
)


class Shipment(BaseModel):
    shipment_id: str
    bill_to: Address
    ship_to: ShippingAddress  # type: ignore[valid-type]


async def test_two_nested_models_of_one_name_keep_their_own_avro_schemas(
    settings, topics, producer, pg, unique
):
    # The derived Avro schema named each record by its class name, and a second use of a
    # name referred to the first: shipping's Address was written and read with billing's
    # fields, its `instructions` silently dropped. Two shipments differing only there were
    # the same bytes, so the second was a duplicate, never a conflict, and the handler
    # received instructions="" for both.
    topic = await topics("avro-names", partitions=1)
    group = f"g-{unique}"
    avro = AvroCodec()
    app = App(group, settings=app_settings(settings))
    app.codec(AVRO, avro)
    seen: list[str] = []

    @app.handler(topic, schema=Shipment, key=lambda s: s.shipment_id, name=f"ship-{unique}")
    async def ship(s: Shipment, ctx: Context) -> None:
        seen.append(s.ship_to.instructions)

    def shipment(instructions: str) -> Shipment:
        return Shipment(
            shipment_id="s-1",
            bill_to=Address(street="1 Main St"),
            ship_to=ShippingAddress(street="2 Side St", instructions=instructions),
        )

    ct = {"content-type": AVRO.encode()}
    try:
        await send(
            producer, topic, value=avro.encode(shipment("leave at door"), Shipment), headers=ct
        )
        await send(producer, topic, value=avro.encode(shipment("ring twice"), Shipment), headers=ct)
        async with running(app):
            await wait_offset(pg, group, topic, 0, 2)
        conflicts = await pg.fetchval(
            "SELECT count(*) FROM dedup.outbox WHERE topic = $1", topic + ".conflicts"
        )
        assert (seen, conflicts) == (["leave at door"], 1)
    finally:
        await cleanup(pg, unique)


class CamelOrder(BaseModel):
    """Validates by JSON names (orderId), as protobuf's JSON mapping spells the fields."""

    model_config = ConfigDict(alias_generator=to_camel)
    order_id: str
    qty: int
    total: Decimal


async def test_a_protobuf_model_with_camel_case_aliases_reads_what_its_codec_writes(
    settings, topics, producer, pg, unique
):
    # ProtobufCodec.encode takes the model's aliases (ParseDict reads JSON names: orderId),
    # but decode handed the model the proto field names (order_id): a record written by the
    # app's own codec, with the same model, was dead-lettered invalid_schema ("orderId:
    # Field required"). Decoded by JSON names when the model validates by them.
    topic = await topics("proto-camel", partitions=1)
    group = f"g-{unique}"
    proto = ProtobufCodec({CamelOrder: payments_pb2.Order})
    app = App(group, settings=app_settings(settings))
    app.codec(PROTO, proto)
    seen: list[tuple[str, int, Decimal]] = []

    @app.handler(topic, schema=CamelOrder, key=lambda o: o.order_id, name=f"camel-{unique}")
    async def take(o: CamelOrder, ctx: Context) -> None:
        seen.append((o.order_id, o.qty, o.total))

    sent = CamelOrder(orderId="c-1", qty=2, total=Decimal("1.25"))
    try:
        value = proto.encode(sent, CamelOrder)
        await send(producer, topic, value=value, headers={"content-type": PROTO.encode()})
        async with running(app):
            await wait_offset(pg, group, topic, 0, 1)
        dead = await pg.fetchval(
            "SELECT count(*) FROM dedup.outbox WHERE topic = $1", topic + ".dlq"
        )
        assert (seen, dead) == ([("c-1", 2, Decimal("1.25"))], 0)
    finally:
        await cleanup(pg, unique)
