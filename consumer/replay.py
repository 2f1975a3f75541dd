"""Re-drive dead letters: ``consumer replay MODULE:APP TOPIC.dlq``.

A message dead-lettered as ``failed`` (transient failures past ``max_attempts``) left nothing
in the inbox, so sending it again applies it once the dependency is back. Replaying is safe
because every copy goes through the same deduplication: a dead letter replayed twice, or one
whose key was applied meanwhile by another copy, is answered as a duplicate. That holds only
while the key's inbox record exists, so dead letters older than 90 % of the dedup window are
skipped (``expired``) unless forced: replayed after the record's deletion, a key applied by a
later copy would apply again.

Each dead letter goes back to ``<topic>`` (the dead-letter topic's name without ``.dlq``), on
the partition named in ``x-source`` when that partition still exists, with its bytes, record
key and its original headers, exactly as they were (``x-original-headers``, which every dead
letter carries: the idempotency-key header the envelope replaced among them, so a message
dead-lettered before its key was even read, ``invalid_schema`` say, is keyed again), and
``x-replayed-from`` names the dead letter. Dead letters written before that header existed
lose the envelope's headers instead, and get the idempotency-key header back from
``x-idempotency-key`` for handlers keyed by it. The read position is committed under the group
``<app group>.replay.<reasons>`` once every copy is acknowledged, so a second run replays only
newer dead letters (a crash in between replays some again, which deduplication absorbs).

A record of the dead-letter topic the Kafka client cannot parse (a header name that is not
UTF-8, from a foreign producer; a corrupt batch) would make every run raise at the same
place: it is read as a stand-in (consumer/runtime/undecodable.py), skipped and named in the
summary (``undecodable``), and the run goes on.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from consumer.app import App
from consumer.constants import (
    DLQ_SUFFIX,
    HEADER_IDEMPOTENCY_KEY,
    HEADER_KEY,
    HEADER_ORIGINAL_HEADERS,
    HEADER_REASON,
    HEADER_REPLAYED_FROM,
    HEADER_SOURCE,
    HEADER_TRUNCATED,
)
from consumer.errors import ConfigError
from consumer.kafka_config import client_options
from consumer.message import location, parse_location
from consumer.outbox.envelopes import DEAD_LETTER_HEADERS, unpack_headers
from consumer.runtime import undecodable
from consumer.settings import Settings

_DROPPED = DEAD_LETTER_HEADERS | {HEADER_REPLAYED_FROM, HEADER_IDEMPOTENCY_KEY}
# A dead letter older than this share of the dedup window is skipped unless forced.
WINDOW_SHARE = 0.9


class TopicMissing(ConfigError):
    """The dead-letter topic, or the topic it would be replayed to, does not exist."""


@dataclass
class ReplaySummary:
    """What one run did, per reason and per target topic."""

    read: int = 0
    replayed: Counter[str] = field(default_factory=Counter)  # by reason
    skipped: Counter[str] = field(default_factory=Counter)  # other reasons, by reason
    expired: Counter[str] = field(default_factory=Counter)  # older than the window, by reason
    targets: Counter[str] = field(default_factory=Counter)  # by topic
    # Records the Kafka client could not parse, skipped: "<topic>/<partition>/<offset>: why".
    undecodable: list[str] = field(default_factory=list)
    group: str = ""


def replay_group(app: App, reasons: Collection[str]) -> str:
    return f"{app.group}.replay.{'+'.join(sorted(reasons))}"


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value is not None else ""


def own_headers(headers: Sequence[tuple[str, bytes]]) -> dict[str, bytes]:
    """The dead letter's own headers by (lower-case) name, which replay decides by.

    The envelope's come after the original's, so the last of a name is the envelope's (a
    dead letter written since envelopes.ENVELOPE_HEADERS has each name once anyway). An
    ``x-truncated`` counts only without ``x-original-headers``: the relay drops that header
    when it cuts a dead letter, and every other dead letter carries it, so an ``x-truncated``
    beside it is the original record's own header, not the relay's note.
    """
    own = {name.lower(): value for name, value in headers}
    if HEADER_ORIGINAL_HEADERS in own:
        own.pop(HEADER_TRUNCATED, None)
    return own


def source_partition(target: str, source: str) -> int | None:
    """The partition in ``x-source: topic/partition/offset``, if it names ``target``."""
    where = parse_location(source)
    return where[1] if where is not None and where[0] == target else None


def original_headers(
    app: App, topic: str, headers: Sequence[tuple[str, bytes]], dlq_position: str
) -> list[tuple[str, bytes]]:
    """The headers to send again: the original ones, with ``x-replayed-from`` naming the
    dead letter; for a dead letter without ``x-original-headers`` (written by an earlier
    version), the envelope's removed and the replaced key header restored."""
    by_name = {name.lower(): value for name, value in headers}
    packed = by_name.get(HEADER_ORIGINAL_HEADERS)
    if packed is not None:
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            kept = unpack_headers(packed.decode("ascii"))
            replayed = HEADER_REPLAYED_FROM
            return [(n, v) for n, v in kept if n.lower() != replayed] + [
                (replayed, dlq_position.encode())
            ]
    out = [(name, value) for name, value in headers if name.lower() not in _DROPPED]
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
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ReplaySummary:
    """Replay the dead letters of ``dlq_topic`` with one of ``reasons`` that arrived since the
    last run; stop at the end offsets seen at the start (or after ``limit`` replays)."""
    target = dlq_topic.removesuffix(DLQ_SUFFIX)
    if target == dlq_topic or not target:
        # Without the suffix the "target" is the topic being read: its records (a conflicts
        # topic's, say) would be written back into it, a second copy of each.
        raise ConfigError(f"{dlq_topic!r} is not a dead-letter topic: name one ending in .dlq")
    summary = ReplaySummary(group=replay_group(app, reasons))
    oldest_ms = (time.time() - settings.dedup_window_s * WINDOW_SHARE) * 1000
    undecodable.install()
    consumer = AIOKafkaConsumer(
        **client_options(settings),
        group_id=summary.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # A dead letter of an aborted transaction (a topic someone else writes) is no record.
        isolation_level=settings.kafka_isolation_level,
    )
    producer = AIOKafkaProducer(**client_options(settings), enable_idempotence=True, acks="all")
    try:
        await consumer.start()
        await producer.start()
        tps, target_parts = await _partitions(consumer, producer, dlq_topic, target)
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        total = sum([end[tp] - await consumer.position(tp) for tp in tps])
        pending: list[Any] = []
        done: dict[TopicPartition, int] = {}

        def full() -> bool:
            return limit is not None and sum(summary.replayed.values()) >= limit

        while not full() and any([await consumer.position(tp) < end[tp] for tp in tps]):
            with undecodable.tolerant():  # an unparseable record comes out as a stand-in
                batch = await consumer.getmany(*tps, timeout_ms=1000, max_records=500)
            for tp, records in batch.items():
                for rec in records:
                    if rec.offset >= end[tp] or full():
                        break
                    summary.read += 1
                    done[tp] = rec.offset + 1
                    if _wanted(rec, summary, reasons, oldest_ms, force) and not dry_run:
                        pending.append(await _send(app, producer, target, target_parts, rec))
            if progress is not None:
                progress(summary.read, total)
        for fut in pending:
            await fut  # acknowledged before the position moves
        if done and not dry_run:
            await consumer.commit(done)
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
        with contextlib.suppress(Exception):
            await consumer.stop()
    return summary


async def _partitions(
    consumer: AIOKafkaConsumer, producer: AIOKafkaProducer, dlq_topic: str, target: str
) -> tuple[list[TopicPartition], set[int]]:
    """The dead-letter topic's partitions and the target's; TopicMissing for either absent."""
    # From the cluster's metadata: asking the producer for a missing topic could create it on
    # a broker that auto-creates topics.
    existing = await consumer.topics()
    for name in (dlq_topic, target):
        if name not in existing:
            raise TopicMissing(f"topic {name!r} does not exist")
    dlq_parts = await producer.partitions_for(dlq_topic)  # exists: nothing is created
    tps = [TopicPartition(dlq_topic, p) for p in sorted(dlq_parts)]
    return tps, set(await producer.partitions_for(target))


def _wanted(
    rec: Any, summary: ReplaySummary, reasons: Collection[str], oldest_ms: float, force: bool
) -> bool:
    """Whether ``rec`` is replayed; counted in ``summary`` under why, either way."""
    if (bad := undecodable.reason_of(rec)) is not None:
        # Its headers cannot be read, so neither can its reason: skipped.
        where = location(rec.topic, rec.partition, rec.offset)
        summary.undecodable.append(f"{where}: {bad.reason}")
        return False
    own = own_headers(rec.headers or ())
    reason = _text(own.get(HEADER_REASON))
    if HEADER_TRUNCATED in own:
        # Sent without its value (outbox/sending.py): nothing to replay.
        summary.skipped["truncated"] += 1
    elif reason not in reasons:
        summary.skipped[reason or "(none)"] += 1
    elif rec.timestamp < oldest_ms and not force:
        summary.expired[reason] += 1
    else:
        summary.replayed[reason] += 1
        summary.targets[rec.topic.removesuffix(DLQ_SUFFIX)] += 1
        return True
    return False


async def _send(
    app: App, producer: AIOKafkaProducer, target: str, target_parts: set[int], rec: Any
) -> Any:
    headers = list(rec.headers or ())
    partition = source_partition(target, _text(own_headers(headers).get(HEADER_SOURCE)))
    if partition not in target_parts:
        partition = None  # the topic shrank or was recreated: the record key decides
    position = location(rec.topic, rec.partition, rec.offset)
    return await producer.send(
        target,
        rec.value,
        key=rec.key,
        partition=partition,
        headers=original_headers(app, target, headers, position),
    )
