"""The fetch loop of a worker: fetch, process each partition's batch, commit, tell.

One iteration (:meth:`FetchLoop.tick`): up to one batch per assigned partition from
``getmany``; records fetched across a seek made meanwhile, or below a partition's floor, are
dropped; the partitions' batches run concurrently (one transaction each); a batch that stopped
pauses its partition until its retry is due; the Kafka offsets are committed after the
database's, in the background (for lag tooling only); then the observers hear of it
(metrics, per-message logs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError, NoOffsetForPartitionError, OffsetOutOfRangeError

from consumer.message import Message
from consumer.observers import Tick
from consumer.runtime import retry_topics, undecodable
from consumer.runtime.cursor import next_position, process_partition
from consumer.runtime.member import Member
from consumer.runtime.outcomes import BatchResult

log = logging.getLogger("consumer.fetch")


def to_message(rec: Any) -> Message:
    headers = tuple((k, bytes(v) if v is not None else b"") for k, v in (rec.headers or ()))
    bad = undecodable.reason_of(rec)
    return Message(
        rec.topic,
        rec.partition,
        rec.offset,
        rec.key,
        rec.value,
        headers,
        rec.timestamp or 0,
        bad.reason if bad else "",
    )


class FetchLoop:
    """The fetch/commit loop of ``worker`` (its consumer, processor, positions and lock)."""

    def __init__(self, worker: Member) -> None:
        self.w = worker
        self._pending: dict[TopicPartition, int] = {}  # Kafka offsets not yet sent
        self._committing: asyncio.Task[None] | None = None

    async def tick(self) -> None:
        w = self.w
        assert w.consumer is not None and w.processor is not None
        await w.probe.point("before_fetch")
        fetched = await self._fetch()
        if not fetched:
            return
        async with w.lock:
            work = retry_topics.hold_back(w.app, w.settings, self._live(fetched), self._retry_later)
            size = w.settings.batch_max_records
            per_tp = await asyncio.gather(
                *(
                    process_partition(
                        w.processor, retry_topics.arrived(w.app, list(map(to_message, recs))), size
                    )
                    for recs in work.values()
                )
            )
            pairs = [(tp, r) for tp, results in zip(work, per_tp, strict=True) for r in results]
            commit = await self._settle(pairs, {tp: recs[-1].offset for tp, recs in work.items()})
            await self._commit(commit)
            self._lag(work, commit)
            w.observer.tick(
                Tick(
                    w.app.group,
                    [tp for tp, _ in pairs],
                    [r for _, r in pairs],
                    w.stats,
                    {t: h.name for t in w.app.topics if (h := w.app.handler_for(t))},
                )
            )

    async def _fetch(self) -> dict[TopicPartition, list[Any]]:
        w = self.w
        assert w.consumer is not None
        # Up to one batch per assigned partition: aiokafka fills max_records from one
        # partition's buffer first, so a single-batch fetch would leave the other partitions'
        # transactions idle while this one waits on PostgreSQL round trips.
        size = w.settings.batch_max_records
        self._seeks = dict(w.positions.seeks)
        try:
            with undecodable.tolerant():  # unparseable records come out as stand-ins
                fetched: dict[TopicPartition, list[Any]] = await w.consumer.getmany(
                    timeout_ms=w.settings.fetch_timeout_ms,
                    max_records=size * max(1, len(w.consumer.assignment())),
                )
                return fetched
        except OffsetOutOfRangeError as exc:
            async with w.lock:
                where = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
                for tp, pos in where.items():
                    await w.positions.halt(tp, pos)
        except NoOffsetForPartitionError as exc:
            # The fetcher looked for a position before seek_to_stored had set one.
            async with w.lock:
                await w.seek_to_stored([tp for tp in exc.args if tp in w.consumer.assignment()])
        return {}

    def _live(self, fetched: dict[TopicPartition, list[Any]]) -> dict[TopicPartition, list[Any]]:
        """The fetched records still wanted: assigned, not fetched across a seek, not stale."""
        w, p = self.w, self.w.positions
        assert w.consumer is not None
        assigned = w.consumer.assignment()
        for tp in fetched:
            if tp in assigned and p.seeks.get(tp) != self._seeks.get(tp):
                w.consumer.seek(tp, p.sought[tp])
        return {
            tp: live
            for tp, recs in fetched.items()
            if tp in assigned
            and p.seeks.get(tp) == self._seeks.get(tp)
            and (live := [r for r in recs if r.offset >= p.floor.get(tp, 0)])
        }

    async def _settle(
        self, pairs: list[tuple[TopicPartition, BatchResult]], last: dict[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        """Count the results, re-seek or pause what stopped; the offsets to commit to Kafka."""
        w = self.w
        commit: dict[TopicPartition, int] = {}
        moved = [tp for tp, result in pairs if result.moved_back]
        if moved:  # re-read from the stored position (records fetched meanwhile dropped)
            await w.seek_to_stored(moved)
        for tp, result in pairs:
            w.stats.add(result)
            if result.next_offset is not None:
                commit[tp] = result.next_offset
            nxt = next_position(result, last[tp])
            if result.retry_offset is not None and nxt.offset is not None:
                self._retry_later(tp, nxt.offset, nxt.delay_s, result.error)
        return commit

    async def _commit(self, commit: dict[TopicPartition, int]) -> None:
        """Kafka's copy of the positions, in the background: the database holds the truth
        (runtime/positions.py never reads Kafka's), so the next fetch does not wait for the
        broker's round trip. One commit in flight at a time; offsets that arrive meanwhile
        are merged and sent by it next (Spring Kafka's ``syncCommits=false``, Karafka's
        asynchronous offset commits)."""
        if not commit:
            return
        self._pending.update(commit)
        if self._committing is None or self._committing.done():
            self._committing = asyncio.create_task(self._send_commits())

    async def _send_commits(self) -> None:
        assert self.w.consumer is not None
        while self._pending:
            commit, self._pending = self._pending, {}
            assigned = self.w.consumer.assignment()
            commit = {tp: off for tp, off in commit.items() if tp in assigned}
            if not commit:
                continue
            try:
                # Bounded: with the broker away, commit would wait for a coordinator.
                await asyncio.wait_for(self.w.consumer.commit(commit), 10)
            except (KafkaError, AssertionError, TimeoutError) as exc:
                # The database holds the truth; Kafka's copy catches up on the next batch.
                log.info("kafka offset commit skipped: %s", exc)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """The last offsets sent before the consumer leaves its group (bounded)."""
        if self._committing is not None and not self._committing.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._committing), timeout_s)

    def _lag(self, work: dict[TopicPartition, Any], commit: dict[TopicPartition, int]) -> None:
        w = self.w
        assert w.consumer is not None
        for tp in work:
            with contextlib.suppress(Exception):
                hw = w.consumer.highwater(tp)
                pos = commit.get(tp) or 0
                if hw is not None and pos:
                    w.stats.lag[f"{tp.topic}/{tp.partition}"] = max(0, hw - pos)

    def _retry_later(self, tp: TopicPartition, offset: int, delay_s: float, error: str) -> None:
        w = self.w
        assert w.consumer is not None
        consumer = w.consumer
        consumer.seek(tp, offset)
        consumer.pause(tp)
        log.info(
            "partition %s/%s paused %.2fs at offset %d: %s",
            tp.topic,
            tp.partition,
            delay_s,
            offset,
            error,
        )

        def resume() -> None:
            w.retry_tasks.pop(tp, None)
            if tp in consumer.assignment() and tp not in w.positions.halted:
                consumer.resume(tp)

        if (earlier := w.retry_tasks.pop(tp, None)) is not None:
            earlier.cancel()  # a retry record's due time, then a stop of the records before it
        w.retry_tasks[tp] = asyncio.get_running_loop().call_later(delay_s, resume)
