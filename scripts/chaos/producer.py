"""Production for the campaign: send the workload in bursts (topics: scripts/toolkit).

Bursts are sent in order and each burst's acks are awaited (a send that fails, for instance
while the broker is down, is sent again) before the next burst starts, so a record never
overtakes one from an earlier burst. A re-sent record may land twice; the copy carries the
same ``chaos-id`` and the checker counts it as one more duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaProducer

from scripts.chaos.workload import Record, Workload

log = logging.getLogger("chaos.producer")


class Producer:
    """Sends workload records to their topics; counts what it had to send again."""

    def __init__(self, bootstrap: str, topics: dict[str, str]) -> None:
        self.bootstrap = bootstrap
        self.topics = topics  # record.target -> topic name
        self.sent = 0
        self.resent = 0
        self._producer: AIOKafkaProducer | None = None
        # Cleared by a fault that needs the topic quiet (re-creating it); bursts wait for it.
        self.gate = asyncio.Event()
        self.gate.set()
        self.idle = asyncio.Event()  # set between bursts
        self.idle.set()

    async def _client(self) -> AIOKafkaProducer:
        if self._producer is None:
            p = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                enable_idempotence=True,
                linger_ms=5,
                request_timeout_ms=10_000,
            )
            await p.start()
            self._producer = p
        return self._producer

    async def close(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
            self._producer = None

    async def _send(self, records: Sequence[Record]) -> list[Record]:
        """Send and await acks; the records that failed."""
        producer = await self._client()
        futures = []
        for r in records:
            fut = await producer.send(
                self.topics[r.target],
                value=r.value,
                key=r.key,
                partition=r.partition,
                headers=r.headers,
            )
            futures.append(fut)
        results = await asyncio.gather(*futures, return_exceptions=True)
        return [r for r, res in zip(records, results, strict=True) if isinstance(res, Exception)]

    async def pause(self) -> None:
        """Hold production after the burst in flight; :meth:`resume` lets it go on."""
        self.gate.clear()
        await self.idle.wait()

    def resume(self) -> None:
        self.gate.set()

    async def send_burst(self, records: Sequence[Record], deadline_s: float = 300) -> None:
        pending = list(records)
        give_up = time.monotonic() + deadline_s
        while pending:
            try:
                failed = await self._send(pending)
            except Exception as exc:  # the client itself broke (broker away at start, ...)
                log.info("producer: %s: %s; reconnecting", type(exc).__name__, exc)
                await self.close()
                failed = pending
            self.sent += len(pending) - len(failed)
            if failed:
                if time.monotonic() > give_up:
                    raise RuntimeError(f"could not produce {len(failed)} records in {deadline_s}s")
                self.resent += len(failed)
                await asyncio.sleep(1.0)
            pending = failed

    async def run(
        self,
        wl: Workload,
        chunk: int,
        duration_s: float,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        """Send every record in bursts of ``chunk`` spread evenly over ``duration_s``."""
        bursts = [wl.records[i : i + chunk] for i in range(0, len(wl.records), chunk)]
        t0 = time.monotonic()
        for n, burst in enumerate(bursts):
            due = t0 + duration_s * n / max(len(bursts), 1)
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await self.gate.wait()
            self.idle.clear()
            try:
                await self.send_burst(burst)
            finally:
                self.idle.set()
            if progress is not None:
                progress((n + 1) / len(bursts))
        await self.close()
