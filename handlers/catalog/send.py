"""Sample records for the catalog app: price changes as Avro, supplier quotes as JSON, and
resends of some of each (the same payload again; some Avro prices resent as JSON, which the
app treats as the same payload: the hash is of the validated model, docs/codecs.md).

    python -m handlers.catalog.send --create-topics  # the two source topics, 3 partitions
    python -m handlers.catalog.send --count 50 --resend 10 [--run r1]

Kafka from ``CONSUMER_KAFKA_BOOTSTRAP``, topics under ``CATALOG_TOPIC_PREFIX`` as the app's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import uuid
from decimal import Decimal
from typing import NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from pydantic import BaseModel

from consumer.codecs.avro import CONTENT_AVRO, AvroCodec
from handlers.catalog.app import prices_topic, quotes_topic
from schemas.catalog import PriceChanged, SupplierQuote

CONTENT_JSON = "application/json"
CURRENCIES = ("EUR", "GBP", "CHF", "JPY", "USD")


class Record(NamedTuple):
    topic: str
    key: bytes  # the Kafka key: the payload's id
    value: bytes
    content_type: str
    partition: int | None  # None: the producer's partitioner, by the record key


def prices(run: str, n: int) -> list[PriceChanged]:
    return [
        PriceChanged(
            change_id=f"{run}-p{i}",
            sku=f"sku-{i % 7}",
            amount=Decimal(f"{10 + i}.{i % 100:02d}"),
            currency=CURRENCIES[i % len(CURRENCIES)],
        )
        for i in range(n)
    ]


def quotes(run: str, n: int) -> list[SupplierQuote]:
    return [
        SupplierQuote(
            quote_id=f"{run}-q{i}",
            supplier=f"supplier-{i % 3}",
            sku=f"sku-{i % 7}",
            amount=Decimal(f"{200 + 3 * i}.{(7 * i) % 100:02d}"),
            currency=CURRENCIES[(i + 2) % len(CURRENCIES)],
        )
        for i in range(n)
    ]


def _json(m: BaseModel) -> bytes:
    return json.dumps(m.model_dump(mode="json")).encode()


def records(
    prefix: str,
    price_list: list[PriceChanged],
    quote_list: list[SupplierQuote],
    *,
    resend: int,
    partitions: int | None = None,
) -> list[Record]:
    """Every price (Avro) and quote (JSON), then the first ``resend`` of each again; with
    ``partitions``, record i goes to partition i % partitions and its resend to the next one,
    so copies are handled by different workers."""
    avro = AvroCodec()

    def part(i: int, shift: int) -> int | None:
        return None if partitions is None else (i + shift) % partitions

    out: list[Record] = []
    for shift, count in ((0, None), (1, resend)):
        for i, p in enumerate(price_list[:count]):
            key = p.change_id.encode()
            if shift == 1 and i % 2 == 1:  # every other resent price: as JSON
                out.append(Record(prices_topic(prefix), key, _json(p), CONTENT_JSON, part(i, 1)))
            else:
                value = avro.encode(p, PriceChanged)
                out.append(Record(prices_topic(prefix), key, value, CONTENT_AVRO, part(i, shift)))
        for i, q in enumerate(quote_list[:count]):
            key = q.quote_id.encode()
            out.append(Record(quotes_topic(prefix), key, _json(q), CONTENT_JSON, part(i, shift)))
    return out


async def send(bootstrap: str, batch: list[Record]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for r in batch:
            await producer.send_and_wait(
                r.topic,
                r.value,
                key=r.key,
                partition=r.partition,
                headers=[("content-type", r.content_type.encode())],
            )
    finally:
        await producer.stop()


async def create_sources(bootstrap: str, prefix: str, partitions: int = 3) -> None:
    """The app's source topics (the framework creates its own .dlq/.conflicts at start)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for topic in (prices_topic(prefix), quotes_topic(prefix)):
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50, help="prices, and as many quotes")
    parser.add_argument("--resend", type=int, default=10, help="of each, sent a second time")
    parser.add_argument("--run", default=uuid.uuid4().hex[:8], help="key prefix of this run")
    parser.add_argument("--create-topics", action="store_true", help="create them, send nothing")
    args = parser.parse_args()
    prefix = os.environ.get("CATALOG_TOPIC_PREFIX", "")
    bootstrap = os.environ.get("CONSUMER_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    if args.create_topics:
        asyncio.run(create_sources(bootstrap, prefix))
        print(f"topics {prices_topic(prefix)} and {quotes_topic(prefix)} exist")
        return
    batch = records(
        prefix, prices(args.run, args.count), quotes(args.run, args.count), resend=args.resend
    )
    asyncio.run(send(bootstrap, batch))
    print(f"sent {len(batch)} records, keys {args.run}-p* and {args.run}-q*")


if __name__ == "__main__":
    main()
