"""Re-drive dead letters: ``consumer replay MODULE:APP TOPIC.dlq``.

A message dead-lettered as ``failed`` (transient failures past ``max_attempts``) left nothing
in the inbox, so sending it again applies it once the dependency is back. Replaying is safe by
construction: every copy goes through the same deduplication, so a dead letter replayed twice,
or one whose key was applied meanwhile by another copy, is answered as a duplicate.

The original bytes, record key and headers are sent back to the topic and partition named in
``x-source``; the headers the dead-letter envelope added are removed, the idempotency-key
header the envelope replaced is restored from ``x-idempotency-key`` for handlers keyed by it,
and ``x-replayed-from`` names the dead letter. The read position is committed under the group
``<app group>.replay.<reasons>`` after the copies are acknowledged, so a second run replays
only newer dead letters (a crash in between replays some again, which is harmless).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumer.app import App
from consumer.constants import (
    DLQ_SUFFIX,
    HEADER_DETAIL,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_KEY,
    HEADER_NAMESPACE,
    HEADER_REASON,
    HEADER_SOURCE,
)
from consumer.settings import Settings

HEADER_REPLAYED_FROM = "x-replayed-from"
# Added by consumer/outbox/envelopes.dead_letter; never part of the original message.
_ENVELOPE = frozenset(
    {HEADER_REASON, HEADER_DETAIL, HEADER_NAMESPACE, HEADER_KEY, HEADER_SOURCE}
    | {HEADER_REPLAYED_FROM}
)


@dataclass
class ReplaySummary:
    """What one run did, per reason and per target topic."""

    read: int = 0
    replayed: Counter[str] = field(default_factory=Counter)  # by reason
    skipped: Counter[str] = field(default_factory=Counter)  # by reason
    targets: Counter[str] = field(default_factory=Counter)  # by topic
    group: str = ""


def replay_group(app: App, reasons: Collection[str]) -> str:
    return f"{app.group}.replay.{'+'.join(sorted(reasons))}"


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value is not None else ""


def _target(dlq_topic: str, source: str) -> tuple[str, int | None]:
    """(topic, partition) of the original record, from ``x-source: topic/partition/offset``."""
    parts = source.rsplit("/", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return dlq_topic.removesuffix(DLQ_SUFFIX), None


def original_headers(
    app: App, topic: str, headers: Sequence[tuple[str, bytes]], dlq_position: str
) -> list[tuple[str, bytes]]:
    """The headers to send again: the envelope's removed, the replaced key header restored."""
    by_name = {name.lower(): value for name, value in headers}
    out = [
        (name, value)
        for name, value in headers
        if name.lower() not in _ENVELOPE and name.lower() != HEADER_IDEMPOTENCY_KEY
    ]
    handler = app.handler_for(topic)
    key = by_name.get(HEADER_KEY)
    if (
        handler is not None
        and handler.key_from == "header"
        and handler.key_header.lower() == HEADER_IDEMPOTENCY_KEY
        and key
    ):
        out.append((HEADER_IDEMPOTENCY_KEY, key))
    out.append((HEADER_REPLAYED_FROM, dlq_position.encode()))
    return out


async def replay(
    app: App,
    settings: Settings,
    dlq_topic: str,
    reasons: Collection[str] = ("failed",),
    *,
    limit: int | None = None,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ReplaySummary:
    """Replay the dead letters of ``dlq_topic`` with one of ``reasons`` that arrived since the
    last run; stop at the end offsets seen at the start (or after ``limit`` replays)."""
    summary = ReplaySummary(group=replay_group(app, reasons))
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=summary.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True, acks="all"
    )
    await consumer.start()
    try:
        await producer.start()
        parts = consumer.partitions_for_topic(dlq_topic) or await _partitions(producer, dlq_topic)
        tps = [TopicPartition(dlq_topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        total = sum([end[tp] - await consumer.position(tp) for tp in tps])
        pending: list[Any] = []
        done: dict[TopicPartition, int] = {}
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            if limit is not None and sum(summary.replayed.values()) >= limit:
                break
            batch = await consumer.getmany(*tps, timeout_ms=1000, max_records=500)
            for tp, records in batch.items():
                for rec in records:
                    if rec.offset >= end[tp]:
                        break
                    if limit is not None and sum(summary.replayed.values()) >= limit:
                        break
                    summary.read += 1
                    done[tp] = rec.offset + 1
                    pending += await _one(app, producer, dlq_topic, rec, reasons, summary, dry_run)
            if progress is not None:
                progress(summary.read, total)
        for fut in pending:
            await fut  # acknowledged before the position moves
        if done and not dry_run:
            await consumer.commit(done)
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
        await consumer.stop()
    return summary


async def _partitions(producer: AIOKafkaProducer, topic: str) -> set[int]:
    parts = await producer.partitions_for(topic)
    return set(parts)


async def _one(
    app: App,
    producer: AIOKafkaProducer,
    dlq_topic: str,
    rec: Any,
    reasons: Collection[str],
    summary: ReplaySummary,
    dry_run: bool,
) -> list[Any]:
    headers = list(rec.headers or ())
    by_name = {name.lower(): value for name, value in headers}
    reason = _text(by_name.get(HEADER_REASON))
    if reason not in reasons:
        summary.skipped[reason or "(none)"] += 1
        return []
    topic, partition = _target(dlq_topic, _text(by_name.get(HEADER_SOURCE)))
    if partition is not None and partition not in (await producer.partitions_for(topic)):
        partition = None  # the topic shrank or was recreated: let the key decide
    summary.replayed[reason] += 1
    summary.targets[topic] += 1
    if dry_run:
        return []
    position = f"{dlq_topic}/{rec.partition}/{rec.offset}"
    fut = await producer.send(
        topic,
        rec.value,
        key=rec.key,
        partition=partition,
        headers=original_headers(app, topic, headers, position),
    )
    return [fut]
