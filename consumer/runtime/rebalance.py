"""The rebalance listener: finish the batch in flight before partitions go, seek on arrival.

aiokafka calls it from the group coordinator; both callbacks take the worker's lock, so a
revocation waits for the batch that holds it (its transaction commits first), and records
fetched before an assignment's seek wait and then meet the stored position's floor.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiokafka import ConsumerRebalanceListener, TopicPartition

from consumer.runtime.member import Member


class RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Member) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        w = self.worker
        async with w.lock:
            w.stats.rebalances += 1
            revoked = list(revoked)
            w.observer.revoked(revoked)
            for tp in revoked:
                handle = w.retry_tasks.pop(tp, None)
                if handle is not None:  # a stale timer must not resume it if it comes back
                    handle.cancel()
                if w.processor is not None:
                    w.processor.forget(tp.topic, tp.partition)
                w.positions.unhalt(tp)  # the new owner finds out for itself
                w.stats.lag.pop(f"{tp.topic}/{tp.partition}", None)  # not ours now

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        async with self.worker.lock:
            await self.worker.seek_to_stored(list(assigned))
