"""The ``topic_recreate`` fault: the input topic deleted and re-created while workers run.

What the framework promises (issue 13, finding 3): a stored position beyond the log end of a
partition is never skipped silently; the worker halts that partition with one error and a
metric, and the operator resets the positions deliberately with ``consumer reset-positions``.

The fault plays the operator:

1. production pauses (after the burst in flight); the whole topic is read (the *retired
   generation*, kept as evidence);
2. the topic is deleted and created again, empty, with the same partitions;
3. the workers are given time to meet the re-created topic and halt (a ``HALTED`` line for
   every partition is awaited in their logs, at most ``HALT_WAIT_S``: a worker may still be
   committing a batch of the old topic it had fetched before the deletion, and the positions
   read next must include it);
4. the stored positions the retired generation reached are read: records at or beyond them
   were never consumed, and only the deletion destroyed them (the operator's loss, not the
   framework's; the checker counts them as ``lost_by_operator``);
5. ``consumer reset-positions ... --to-earliest --yes``;
6. the operator re-produces the never-consumed records from the retired generation (same
   bytes, same ``chaos-id``), then production resumes.

The invariant the checker holds this to: every record of the re-created topic is consumed
and classified, and every key takes effect exactly once across both generations, the
re-produced records included (a key applied from the retired generation is a duplicate in
the new one). Before the fix the worker seeks to the old stored position, Kafka resets to 0,
and the records below the old position are skipped: ``lost``/``unclassified``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from scripts.chaos import collect
from scripts.chaos.collect import Rec
from scripts.chaos.producer import Producer
from scripts.chaos.workload import Record

# The worker's error line (consumer/runtime/worker.py): "partition <topic>/<n> HALTED: ..."
HALT = re.compile(rb"partition (\S+)/(\d+) HALTED")
HALT_WAIT_S = 45.0
RESET_TIMEOUT_S = 60


@dataclass
class Retired:
    """One deleted incarnation of a topic: its records and the positions consumed up to."""

    topic: str
    records: list[Rec] = field(default_factory=list)
    consumed: dict[int, int] = field(default_factory=dict)  # partition -> stored position


def _halts(logs: list[Path], topic: str) -> Counter[int]:
    """How many HALTED lines each partition of ``topic`` has in the logs so far."""
    n: Counter[int] = Counter()
    for path in logs:
        with contextlib.suppress(OSError):
            for t, part in HALT.findall(path.read_bytes()):
                if t.decode() == topic:
                    n[int(part)] += 1
    return n


async def _recreate(bootstrap: str, topic: str, partitions: int) -> float:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    t0 = time.monotonic()
    try:
        await admin.delete_topics([topic])
        # Deletion is asynchronous in the broker: creating again fails until it is done.
        for attempt in range(100):
            try:
                await admin.create_topics([NewTopic(topic, partitions, 1)])
                break
            except KafkaError:
                if attempt == 99:
                    raise
                await asyncio.sleep(0.3)
    finally:
        await admin.close()
    return time.monotonic() - t0


def _reset(app_spec: str, topic: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    argv = [sys.executable, "-m", "consumer", "reset-positions", app_spec, "--topic", topic]
    argv += ["--to-earliest", "--yes"]
    proc = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=RESET_TIMEOUT_S
    )
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


async def recreate(
    *,
    bootstrap: str,
    dsn: str,
    topic: str,
    partitions: int,
    group: str,
    producer: Producer,
    originals: dict[str, Record],
    unparseable: dict[tuple[int, int], dict[str, str]],
    logs: list[Path],
    app_spec: str,
    env: dict[str, str],
    cwd: Path,
) -> tuple[Retired, str, bool]:
    """Run the fault; the retired generation, a description, and whether it took."""
    await producer.pause()
    try:
        retired = Retired(
            topic, await collect.read_topic(bootstrap, topic, partitions, unparseable)
        )
        halts_before = _halts(logs, topic)
        seconds = await _recreate(bootstrap, topic, partitions)
        halted = False
        for _ in range(int(HALT_WAIT_S / 0.5)):  # a log file to watch: no event to await
            # Every partition, not the first: the stored positions are read next, and a
            # partition not yet halted may have a batch of the deleted topic in flight.
            now = _halts(logs, topic)
            if halted := all(now[p] > halts_before[p] for p in range(partitions)):
                break
            await asyncio.sleep(0.5)
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT partition, next_offset FROM dedup.offsets WHERE group_id = $1 "
                "AND topic = $2",
                group,
                topic,
            )
        finally:
            await conn.close()
        retired.consumed = {r[0]: r[1] for r in rows}
        code, last = await asyncio.to_thread(_reset, app_spec, topic, env, cwd)
        lost = [r for r in retired.records if r.offset >= retired.consumed.get(r.partition, 0)]
        # The original bytes of each (the evidence has decoded headers only).
        again = [o for r in lost if (o := originals.get(r.headers.get("chaos-id", "")))]
        await producer.send_burst(again)
    finally:
        producer.resume()
    halts = "every partition" if halted else "NOT every partition"
    detail = (
        f"deleted and re-created in {seconds:.1f}s; {halts} halted in {HALT_WAIT_S:.0f}s; "
        f"reset-positions exit {code} ({last[:80]}); "
        f"{len(lost)} never consumed, {len(again)} re-produced"
    )
    # The fault took: the topic was re-created. Whether the framework halted, and whether
    # the reset worked, shows in the detail and in the checker's verdicts.
    return retired, detail, True
