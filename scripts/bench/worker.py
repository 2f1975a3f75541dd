"""One benchmark worker process: ``python -m scripts.bench.worker '<json spec>'``.

Started by the orchestrator (legs.py), one per worker of a leg; the stdin/stdout protocol and
the meter are in harness.py. Modes: ``raw`` and ``naive`` (baselines.py), and ``framework``
(``framework_batch``): the real ``Worker`` with the bench app (its batch-handler version,
benchapp.py) and the relay disabled, instrumented through the
framework's public seams (nothing in ``consumer/`` knows about the benchmark): an observer
(consumer/observers.py) meters every committed transaction (right after its COMMIT) and every
fetch-loop iteration, and a probe (consumer/probe.py) holds the first fetch at the start line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from consumer import load_settings
from consumer.observers import Observer, Tick
from consumer.probe import Probe
from consumer.runtime.outcomes import BatchResult, Outcome
from consumer.runtime.worker import Worker, tune_gc
from scripts.bench.benchapp import build_app, build_batch_app
from scripts.bench.harness import Control, Meter, emit, watch_assignment


class _Meter(Observer):
    def __init__(self, meter: Meter, latency: bool) -> None:
        self.meter = meter
        self.latency = latency

    def committed(self, result: BatchResult) -> None:
        if self.latency:
            self.meter.committed(
                [h.message for h in result.handled if h.outcome != Outcome.SKIPPED]
            )

    def tick(self, tick: Tick) -> None:
        self.meter.done(sum(len(r.handled) for r in tick.results))


class _StartLine(Probe):
    """Holds the first fetch until ``go``: every worker of the leg is a member by then."""

    def __init__(self, worker: BenchWorker) -> None:
        self.worker = worker
        self.passed = False

    async def point(self, name: str) -> None:
        if name != "before_fetch" or self.passed:
            return
        w = self.worker
        # The group join and the rebalances happen in aiokafka's background task; only the
        # fetching waits, so every worker of the leg is a member before any record is read.
        if not await w.control.wait_go():
            return
        self.passed = True
        w.meter.started()
        assert w.consumer is not None
        w.consumer.resume(*w.consumer.assignment())


class BenchWorker(Worker):
    """The framework's Worker, held at the start line until ``go``, with a meter attached."""

    def __init__(self, spec: dict[str, Any], control: Control, meter: Meter) -> None:
        settings = load_settings(**spec["settings"])
        build = build_batch_app if spec["mode"] == "framework_batch" else build_app
        app = build(spec["group"], spec["topic"], spec["out_topic"], settings)
        self.control = control
        self.meter = meter
        super().__init__(
            app,
            settings,
            spec.get("worker_id", 0),
            observer=_Meter(meter, bool(spec.get("latency"))),
            probe=_StartLine(self),
        )

    async def seek_to_stored(self, tps: list[TopicPartition]) -> None:
        await super().seek_to_stored(tps)
        if not self.control.go.is_set() and self.consumer is not None and tps:
            # Nothing is fetched ahead of the start line (aiokafka prefetches otherwise).
            self.consumer.pause(*tps)


async def run_framework(spec: dict[str, Any], control: Control, meter: Meter) -> dict[str, Any]:
    worker = BenchWorker(spec, control, meter)
    tune_gc()  # as `consumer run` does
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
        if mode in ("framework", "framework_batch"):
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
