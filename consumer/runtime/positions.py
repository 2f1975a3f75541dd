"""The stored positions of a worker's partitions, and the partitions halted at one.

Positions come from the database only. A partition without a stored position starts at its
log start; Kafka's committed offset (kept for lag tooling) is never read, since it can be ahead
of a database restored from a backup. A stored position the broker no longer has (beyond the
log end: the topic was deleted and re-created; before the log start: retention deleted
records never consumed) is never skipped: that partition is halted (paused, one error line,
``consumer_partition_halted``) until ``consumer reset-positions`` moves it; a halted
partition's stored position is re-read every ``HALT_RECHECK_S`` seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from consumer.db import offsets
from consumer.observers import Observer

log = logging.getLogger("consumer.positions")

# How often a halted partition's stored position is read again (a reset resumes it).
HALT_RECHECK_S = 3.0

Expect = Callable[[str, int, int | None], None]  # BatchProcessor.expect


class Positions:
    """Seeks ``consumer``'s partitions to the positions ``group`` stored in ``pool``."""

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        pool: Any,
        group: str,
        expect: Expect,
        observer: Observer,
        stopping: asyncio.Event,
    ) -> None:
        self.consumer = consumer
        self.pool = pool
        self.group = group
        self.expect = expect
        self.observer = observer
        self.stopping = stopping
        # Stored position of each partition at assignment; records below it are stale.
        self.floor: dict[TopicPartition, int] = {}
        # Seeks per partition, and the last position sought: records a getmany() returns
        # after a seek made while it ran may come from the old position; they are dropped
        # and the partition is sought again, so they are fetched again from the right one.
        self.seeks: dict[TopicPartition, int] = {}
        self.sought: dict[TopicPartition, int] = {}
        # Partitions stopped at a stored position the broker does not have: (position, why).
        self.halted: dict[TopicPartition, tuple[int, str]] = {}

    async def _stored(self, tps: list[TopicPartition]) -> dict[tuple[str, int], int] | None:
        text, args = offsets.stored(self.group, [(tp.topic, tp.partition) for tp in tps])
        for attempt in itertools.count(1):  # without them no record may be processed
            try:
                return {(r[0], r[1]): r[2] for r in await self.pool.fetch(text, *args)}
            except Exception as exc:  # the database may be restarting
                if self.stopping.is_set():
                    # Draining: nothing will be processed, and a record fetched from Kafka's
                    # older committed position is skipped by the batch's stored-offset check.
                    return None
                log.warning("reading stored positions failed (%s); retry %d", exc, attempt)
                await asyncio.sleep(min(0.2 * attempt, 2.0))
        raise AssertionError("unreachable")

    async def seek_to_stored(self, tps: list[TopicPartition]) -> None:
        if not tps:
            return
        positions = await self._stored(tps)
        if positions is None:
            return
        fresh = []
        for tp in tps:
            pos = positions.get((tp.topic, tp.partition))
            self.expect(tp.topic, tp.partition, pos)
            if pos is not None:
                self.seek(tp, pos)
                self.floor[tp] = pos
            else:
                self.floor.pop(tp, None)
                fresh.append(tp)
        if fresh:
            await self._seek_to_log_start(fresh)

    async def _seek_to_log_start(self, fresh: list[TopicPartition]) -> None:
        # Never consumed by this group (per the database): from the log start, whatever
        # offset Kafka has committed for the group.
        try:
            starts = await self.consumer.beginning_offsets(fresh)
        except Exception as exc:
            # No position is set: the fetcher raises NoOffsetForPartitionError (the automatic
            # reset is off) and the fetch loop comes back here.
            log.warning("reading the log start of %d partitions failed: %s", len(fresh), exc)
            starts = {}
        for tp in fresh:
            if tp in starts:
                self.seek(tp, starts[tp])

    def seek(self, tp: TopicPartition, pos: int) -> None:
        self.consumer.seek(tp, pos)
        self.seeks[tp] = self.seeks.get(tp, 0) + 1
        self.sought[tp] = pos

    async def halt(self, tp: TopicPartition, pos: int) -> None:
        """Stop ``tp`` at a stored position the broker does not have (never skip to another)."""
        if tp not in self.consumer.assignment():
            return
        self.consumer.pause(tp)
        if self.halted.get(tp, (None,))[0] == pos:
            return
        try:
            start = (await self.consumer.beginning_offsets([tp]))[tp]
            end = (await self.consumer.end_offsets([tp]))[tp]
        except Exception as exc:  # the reason is told without them
            start = end = -1
            log.warning("reading the log range of %s/%s failed: %s", tp.topic, tp.partition, exc)
        reason = "before_log_start" if 0 <= pos < start else "beyond_log_end"
        self.halted[tp] = (pos, reason)
        self.observer.halted(tp.topic, tp.partition, reason, True)
        log.error(
            "partition %s/%s HALTED: stored position %d is %s (log start %d, log end %d); "
            "records there would be lost if skipped. Nothing is consumed from it until an "
            "operator runs `consumer reset-positions ... --topic %s --partition %d "
            "(--to-earliest | --to-offset N)`",
            tp.topic,
            tp.partition,
            pos,
            reason.replace("_", " "),
            start,
            end,
            tp.topic,
            tp.partition,
        )

    def unhalt(self, tp: TopicPartition) -> None:
        """Forget a halt (revoked, or moved by a reset); the metric follows."""
        halted = self.halted.pop(tp, None)
        if halted is not None:
            self.observer.halted(tp.topic, tp.partition, halted[1], False)

    async def recheck_halted(self, lock: asyncio.Lock) -> None:
        """Resume halted partitions whose stored position an operator has reset."""
        while True:
            await asyncio.sleep(HALT_RECHECK_S)
            if not self.halted:
                continue
            async with lock:
                tps = list(self.halted)
                text, args = offsets.stored(self.group, [(t.topic, t.partition) for t in tps])
                try:
                    rows = await self.pool.fetch(text, *args)
                except Exception as exc:  # tried again at the next interval
                    log.warning("re-reading stored offsets of halted partitions failed: %s", exc)
                    continue
                now = {(r[0], r[1]): r[2] for r in rows}
                for tp in tps:
                    pos = now.get((tp.topic, tp.partition))
                    if pos is not None and pos != self.halted[tp][0]:
                        self._resume(tp, pos)

    def _resume(self, tp: TopicPartition, pos: int) -> None:
        log.warning(
            "partition %s/%s resumed at stored position %d (was halted at %d)",
            tp.topic,
            tp.partition,
            pos,
            self.halted[tp][0],
        )
        self.unhalt(tp)
        if tp in self.consumer.assignment():
            self.expect(tp.topic, tp.partition, pos)
            self.seek(tp, pos)
            self.floor[tp] = pos
            self.consumer.resume(tp)
