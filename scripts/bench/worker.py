"""One benchmark worker process: ``python -m scripts.bench.worker '<json spec>'``.

Started by the orchestrator (legs.py), one per worker of a leg; the stdin/stdout protocol and
the meter are in harness.py. Modes: ``raw`` and ``naive`` (baselines.py), and ``framework``:
the real ``Worker`` with the bench app and the relay disabled, instrumented from the outside
(nothing in ``consumer/`` knows about the benchmark). Its commit latency is taken right after
``BatchProcessor._transact`` returns, which is after the batch's COMMIT.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from consumer import load_settings
from consumer.message import Message
from consumer.runtime.batch import BatchProcessor
from consumer.runtime.outcomes import BatchResult, Outcome
from consumer.runtime.worker import Worker
from scripts.bench.benchapp import build_app
from scripts.bench.harness import Control, Meter, emit, watch_assignment


class BenchWorker(Worker):
    """The framework's Worker, held at the start line until ``go``, with a meter attached."""

    def __init__(self, spec: dict[str, Any], control: Control, meter: Meter) -> None:
        settings = load_settings(**spec["settings"])
        app = build_app(spec["group"], spec["topic"], spec["out_topic"], settings)
        super().__init__(app, settings, spec.get("worker_id", 0))
        self.control = control
        self.meter = meter
        self.latency = bool(spec.get("latency"))
        self._hooked = False

    async def seek_to_stored(self, tps: list[TopicPartition]) -> None:
        await super().seek_to_stored(tps)
        if not self.control.go.is_set() and self.consumer is not None and tps:
            # Nothing is fetched ahead of the start line (aiokafka prefetches otherwise).
            self.consumer.pause(*tps)

    async def _tick(self) -> None:
        if not self._hooked:
            # The group join and the rebalances happen in aiokafka's background task; only the
            # fetching waits, so every worker of the leg is a member before any record is read.
            if not await self.control.wait_go():
                return
            assert self.processor is not None and self.consumer is not None
            self._instrument(self.processor)
            self._hooked = True
            self.meter.started()
            self.consumer.resume(*self.consumer.assignment())
        await super()._tick()

    def _instrument(self, proc: BatchProcessor) -> None:
        meter = self.meter
        process, transact = proc.process, proc._transact

        async def timed_process(records: Sequence[Message]) -> BatchResult:
            result = await process(records)
            meter.done(len(result.handled))
            return result

        async def timed_transact(*args: Any) -> BatchResult:
            result = await transact(*args)
            # _transact returns after its transaction committed: this is the commit time.
            meter.committed([h.message for h in result.handled if h.outcome != Outcome.SKIPPED])
            return result

        proc.process = timed_process  # type: ignore[method-assign]
        if self.latency:
            proc._transact = timed_transact  # type: ignore[method-assign,assignment]


def _experiment(name: str) -> None:
    """What-if measurements, never a framework mode: see docs/benchmarks.md."""
    if name == "no-savepoints":
        # Handlers run without a savepoint: what the per-message SAVEPOINT/RELEASE round trips
        # cost. Unsafe when a handler fails (its partial writes would stay); the benchmark's
        # handler never fails, and the exactly-once check still runs.
        from consumer.db.tx import PgTx

        async def nothing(self: PgTx) -> None:
            return None

        PgTx.savepoint = PgTx.release_savepoint = nothing  # type: ignore[method-assign]
    elif name:
        raise ValueError(f"unknown experiment {name!r}")


async def run_framework(spec: dict[str, Any], control: Control, meter: Meter) -> dict[str, Any]:
    _experiment(spec.get("experiment", ""))
    worker = BenchWorker(spec, control, meter)
    control.on_stop.append(worker.stop.set)

    def assignment() -> Any:
        return worker.consumer.assignment() if worker.consumer is not None else ()

    watcher = asyncio.create_task(watch_assignment(assignment))
    try:
        await worker.run()
    finally:
        watcher.cancel()
    return {"stats": worker.stats.by_outcome}


async def main(spec: dict[str, Any]) -> Any:
    """Run the worker; returns the stopped profiler when ``spec["profile"]`` asked for one."""
    control = Control()
    control.start()
    meter = Meter()
    profiler = None
    if spec.get("profile"):
        from pyinstrument import Profiler

        # "disabled": sample the whole thread (every task, the loop, the idle wait), not one task.
        profiler = Profiler(interval=0.001, async_mode="disabled")

        async def start_profiler() -> None:
            await control.go.wait()
            profiler.start()

        asyncio.get_running_loop().create_task(start_profiler())
    mode = spec["mode"]
    extra: dict[str, Any] = {}
    try:
        if mode == "framework":
            extra = await run_framework(spec, control, meter)
        else:
            from scripts.bench import baselines

            extra = await baselines.run(mode, spec, control, meter)
    except Exception as exc:
        logging.exception("bench worker failed")
        extra = {"error": f"{type(exc).__name__}: {exc}"}
    if profiler is not None and profiler.is_running:
        profiler.stop()
    emit(meter.report(**extra))
    return profiler


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    spec = json.loads(sys.argv[1])
    done = asyncio.run(main(spec))
    if done is not None and done.last_session is not None:
        path = Path(spec["profile"])
        path.write_text(done.output_text(unicode=True, color=False, show_all=False))
        path.with_suffix(".html").write_text(done.output_html())
