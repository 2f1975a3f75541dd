"""The relay's Kafka producer: what the relay needs of one, and how it is started and stopped.

An idempotent producer (``acks=all``): the broker drops the producer's own retries, and a row
sent again by a later tick carries the same ``idempotency-key`` for the consumers downstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer

from consumer.kafka_config import client_options, quiet_missing_topic_lines
from consumer.settings import Settings

log = logging.getLogger(__name__)


class Sender(Protocol):
    """What the relay needs from a producer: an ``AIOKafkaProducer`` (or a subclass)."""

    client: Any  # for a fresh view of the cluster's topics when a topic does not resolve

    async def partitions_for(self, topic: str) -> Any: ...

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[Any]: ...


class BrokerUnavailable(Exception):
    """Nothing in a tick was acknowledged and at least one failure was retriable."""


async def start(settings: Settings) -> AIOKafkaProducer:
    """A started idempotent producer (``acks=all``) configured from the settings."""
    quiet_missing_topic_lines()  # the relay reports missing topics itself (outbox/topics.py)
    producer = AIOKafkaProducer(
        **client_options(settings),
        enable_idempotence=True,  # broker-side dedup of the producer's own retries
        acks="all",
        linger_ms=5,
        request_timeout_ms=settings.relay_publish_timeout_ms,
    )
    try:
        await producer.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await producer.stop()
        raise
    return producer


async def stop(producer: Any, settings: Settings, *, stopping: bool) -> None:
    """Flush and close. When the relay is asked to stop, within a second: rows not acked
    yet are sent again by the next relay with the same keys, and an idempotent producer
    whose broker never acks would otherwise hold the worker's exit past its grace period
    (aiokafka retries such batches without expiring them)."""
    grace = 1.0 if stopping else settings.relay_publish_timeout_ms / 1000
    try:
        await asyncio.wait_for(producer.stop(), grace)
    except Exception as exc:
        log.warning("relay: producer did not stop cleanly (%s); closing it", type(exc).__name__)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.client.close(), 1.0)
