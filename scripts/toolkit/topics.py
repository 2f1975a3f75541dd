"""Topics: created for a run, read back from the beginning (no consumer group, no commit).

Readers here see what is on the broker now; they never commit and never join a group, so
reading a topic changes nothing for the consumers under test.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError


async def create_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    exist_ok: bool = False,
    visible_within_s: float = 0.0,
) -> None:
    """Create ``{name: partitions}`` (replication 1).

    ``exist_ok`` leaves a topic that exists as it is (one request per topic, so one that
    exists does not stop the others); ``visible_within_s`` waits until the broker lists every
    topic (creation is asynchronous on the broker) or raises RuntimeError.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        new = [NewTopic(name, partitions, 1) for name, partitions in topics.items()]
        if exist_ok:
            for topic in new:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics([topic])
        else:
            await admin.create_topics(new)
        if visible_within_s:
            await _visible(admin, set(topics), visible_within_s)
    finally:
        await admin.close()


async def _visible(admin: AIOKafkaAdminClient, wanted: set[str], within_s: float) -> None:
    for _ in range(max(1, int(within_s * 10))):
        if wanted <= set(await admin.list_topics()):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"topics not visible after {within_s:.0f}s: {sorted(wanted)}")


async def read_partition(
    consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int, out: list[Any]
) -> tuple[int, Exception | None]:
    """Append the records of ``tp`` from ``start`` up to ``end`` to ``out``.

    Returns the position reached and, if a fetch raised (a record the client cannot parse,
    say), the error: the position is then that of the fetch that failed, short of ``end``.
    """
    consumer.assign([tp])
    consumer.seek(tp, start)
    pos = start
    while pos < end:
        try:
            batch = await consumer.getmany(tp, timeout_ms=1000, max_records=5000)
        except (UnicodeDecodeError, KafkaError) as exc:
            return pos, exc
        out.extend(r for r in batch.get(tp, []) if r.offset < end)
        pos = await consumer.position(tp)
    return pos, None


async def read_topic(
    bootstrap: str, topic: str, expect: int | None = None, timeout_s: float = 60.0
) -> list[Any]:
    """The records of ``topic`` from the beginning, per partition in offset order.

    Without ``expect``: everything up to the end offsets as they are now. With ``expect``:
    wait (bounded by ``timeout_s``) until that many records have arrived, e.g. while a relay
    publishes.
    """
    probe = AIOKafkaProducer(bootstrap_servers=bootstrap)  # waits for the topic's metadata
    await probe.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(await probe.partitions_for(topic))]
    finally:
        await probe.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        if expect is None:
            return await asyncio.wait_for(_to_end(consumer, tps), timeout_s)
        return await _until(consumer, tps, expect, timeout_s)
    finally:
        await consumer.stop()


async def _to_end(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> list[Any]:
    starts = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
    out: list[Any] = []
    for tp in tps:
        _, error = await read_partition(consumer, tp, starts[tp], ends[tp], out)
        if error is not None:  # the client's own error, as a plain consumer would raise it
            raise error
    return out


async def _until(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], expect: int, timeout_s: float
) -> list[Any]:
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    out: dict[TopicPartition, list[Any]] = {tp: [] for tp in tps}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    topic = tps[0].topic if tps else "?"
    while sum(len(v) for v in out.values()) < expect:
        assert loop.time() < deadline, f"{topic}: timed out reading"
        for tp, recs in (await consumer.getmany(timeout_ms=200)).items():
            out[tp].extend(recs)
    return [r for tp in tps for r in out[tp]]
