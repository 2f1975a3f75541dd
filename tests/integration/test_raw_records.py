"""consumer.testing.raw_records: records with header names that are not UTF-8, on real Kafka.

The helper exists so that tests (and the chaos campaign's ``unparseable_record`` fault) can
put on a topic what other clients may send and aiokafka's own producer cannot build.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer import Settings
from consumer.testing.raw_records import send_raw
from scripts.chaos.collect import read_topic

pytestmark = pytest.mark.integration


async def test_a_non_utf8_header_name_reaches_the_log_and_aiokafka_cannot_parse_it(
    settings: Settings, topics: Callable[..., Awaitable[str]]
) -> None:
    topic = await topics("raw", partitions=1)
    bootstrap = settings.kafka_bootstrap
    first = await send_raw(bootstrap, topic, 0, [(b"k0", b"fine", [(b"ok", b"1")])])
    bad = await send_raw(bootstrap, topic, 0, [(b"k1", b"v1", [(b"\xff\xfe", b"x"), (b"b", None)])])
    last = await send_raw(bootstrap, topic, 0, [(b"k2", b"after", [])])
    assert (first, bad, last) == ([0], [1], [2])

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        with pytest.raises(UnicodeDecodeError):  # what a worker's getmany meets today
            await consumer.getmany(tp, timeout_ms=5000)
    finally:
        await consumer.stop()

    # The campaign's evidence reader goes past it when told where it is.
    recs = await read_topic(bootstrap, topic, 1, {(0, 1): {"chaos-id": "raw"}})
    assert [(r.offset, r.value) for r in recs] == [(0, b"fine"), (1, None), (2, b"after")]
    assert recs[1].headers == {"chaos-id": "raw"}
