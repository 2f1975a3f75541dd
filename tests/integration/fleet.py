"""Harness for the multi-process worker tests: processes, a paced feed, the group's state.

``Fleet`` starts ``python -m consumer ...`` processes and signals only those; ``Feed``
produces keys k0, k1, ... (one in ``COPY_EVERY`` twice, on two partitions) and remembers the
end offset of each partition; ``Group`` reads what PostgreSQL and the broker say and checks
that every key took effect exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from consumer.exitcodes import RET_OK
from scripts.toolkit import processes

APP = "tests.apps.counting:app"
PARTITIONS = 6
COPY_LAG = 150  # the copy of key i is sent along with key i + COPY_LAG, on another partition
COPY_EVERY = 3  # keys i with i % COPY_EVERY == 0 have a copy
WAIT_S = 60.0


# ---------------------------------------------------------------- processes


class Fleet:
    """The processes this test started (only those are ever signalled), with their logs."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.dir = tmp_path
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = processes.spawn(processes.consumer_argv(*argv), self.env, self.dir / f"{name}.log")
        self.procs[name] = proc
        return proc

    def worker(self, name: str, slot: int, *extra: str) -> subprocess.Popen[bytes]:
        return self._spawn(name, ["worker", APP, "--id", str(slot), "--no-relay", *extra])

    def supervisor(self, name: str, workers: int) -> subprocess.Popen[bytes]:
        return self._spawn(name, ["run", APP, "--workers", str(workers), "--no-relay"])

    def children(self, name: str) -> list[int]:
        """Worker pids of a supervisor this test started."""
        return processes.children(self.procs[name].pid)

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def exit_code(self, name: str, timeout_s: float = 40.0) -> int:
        proc = self.procs[name]
        code = await processes.wait_exit(proc, timeout_s)
        if code is None:
            raise AssertionError(f"{name} (pid {proc.pid}) still running after {timeout_s}s")
        return code

    async def terminate(self, *names: str) -> None:
        """SIGTERM these processes; each must drain and exit RET_OK."""
        for name in names:
            self.procs[name].send_signal(signal.SIGTERM)
        for name in names:
            assert await self.exit_code(name) == RET_OK, f"{name} did not stop cleanly"

    def cleanup(self) -> None:
        for proc in self.procs.values():
            processes.kill_tree(proc)  # stopped (SIGSTOP) processes die of it too
        for proc in self.procs.values():
            processes.reap(proc)

    def dump(self) -> None:
        """Log tails, printed on the way out (pytest shows them when the test failed)."""
        for name in self.procs:
            print(f"----- {name} -----\n" + "\n".join(self.log(name).splitlines()[-40:]))


# ---------------------------------------------------------------- messages


class Feed:
    """Produces keys k0, k1, ... at a steady pace; one in COPY_EVERY twice, on two partitions."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, traps: dict[int, dict[str, Any]]):
        self.producer = producer
        self.topic = topic
        self.traps = traps
        self.sent = 0  # keys whose first copy is sent
        self.end: dict[int, int] = {}  # partition -> next offset after the last message
        self.stop = asyncio.Event()
        self.done = asyncio.Event()

    def payload(self, i: int) -> bytes:
        return json.dumps({"n": i, **self.traps.get(i, {})}).encode()

    def _send(self, i: int, partition: int) -> Awaitable[Any]:
        return self.producer.send(
            self.topic, self.payload(i), headers=headers_for(f"k{i}"), partition=partition
        )

    async def _flush(self, futures: list[Awaitable[Any]]) -> None:
        for meta in await asyncio.gather(*[await f for f in futures]):
            self.end[meta.partition] = max(self.end.get(meta.partition, 0), meta.offset + 1)

    async def run(self, minimum: int, rate: float = 300.0, chunk: int = 30) -> None:
        """At least ``minimum`` keys, and on until ``stop`` is set; then the pending copies."""
        try:
            while (self.sent < minimum or not self.stop.is_set()) and self.sent < 20_000:
                futures = []
                for i in range(self.sent, self.sent + chunk):
                    futures.append(self._send(i, i % PARTITIONS))
                    j = i - COPY_LAG
                    if j >= 0 and j % COPY_EVERY == 0:
                        futures.append(self._send(j, (j + 3) % PARTITIONS))
                self.sent += chunk
                await self._flush(futures)
                await asyncio.sleep(chunk / rate)
            first_unsent = max(self.sent - COPY_LAG, 0)
            await self._flush(
                [
                    self._send(j, (j + 3) % PARTITIONS)
                    for j in range(first_unsent, self.sent)
                    if j % COPY_EVERY == 0
                ]
            )
        finally:
            self.done.set()

    @property
    def keys(self) -> set[str]:
        return {f"k{i}" for i in range(self.sent)}


# ---------------------------------------------------------------- checks


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = WAIT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(0.2)


class Group:
    """What the database and the broker say about the test's group."""

    def __init__(self, pg: asyncpg.Connection, admin: AIOKafkaAdminClient, env: dict[str, str]):
        self.pg = pg
        self.admin = admin
        self.group = env["COUNTING_GROUP"]
        self.topic = env["COUNTING_TOPIC"]
        self.run = env["COUNTING_RUN"]
        self.namespace = f"{self.group}.count"
        self.regressions: list[str] = []

    async def applied_keys(self) -> int:
        n: int = await self.pg.fetchval(
            "SELECT count(DISTINCT k) FROM test_worker_effects WHERE run = $1", self.run
        )
        return n

    async def more_applied(self, n: int) -> None:
        """Wait until ``n`` more keys than now have been applied (the stream goes on)."""
        start = await self.applied_keys()
        await eventually(lambda: gt(self.applied_keys(), start + n), f"{n} more keys applied")

    async def applied_by(self, pid: int) -> int:
        n: int = await self.pg.fetchval(
            "SELECT count(*) FROM test_worker_effects WHERE run = $1 AND pid = $2", self.run, pid
        )
        return n

    async def stored(self) -> dict[int, int]:
        rows = await self.pg.fetch(
            "SELECT partition, next_offset FROM dedup.offsets WHERE group_id = $1 AND topic = $2",
            self.group,
            self.topic,
        )
        return {r["partition"]: r["next_offset"] for r in rows}

    async def members(self) -> tuple[str, list[str]]:
        resp = await self.admin.describe_consumer_groups([self.group])
        g = resp[0].to_object()["groups"][0]
        return g["state"], [m["member_id"] for m in g["members"]]

    async def watch_offsets(self) -> None:
        """Sample stored positions until cancelled; a position that moves back is recorded."""
        seen: dict[int, int] = {}
        while True:
            for part, pos in (await self.stored()).items():
                if pos < seen.get(part, -1):
                    self.regressions.append(f"partition {part}: {seen[part]} -> {pos}")
                seen[part] = max(pos, seen.get(part, -1))
            await asyncio.sleep(0.02)

    async def wait_consumed(self, feed: Feed, timeout_s: float = WAIT_S) -> None:
        await asyncio.wait_for(feed.done.wait(), timeout_s)

        async def at_end() -> bool:
            stored = await self.stored()
            return all(stored.get(p, -1) >= end for p, end in feed.end.items())

        await eventually(at_end, "every partition's stored position at its end", timeout_s)

    async def assert_exactly_once(self, feed: Feed) -> None:
        rows = await self.pg.fetch(
            "SELECT k, count(*) AS n FROM test_worker_effects WHERE run = $1 GROUP BY k", self.run
        )
        counts = {r["k"]: r["n"] for r in rows}
        twice = sorted((k, n) for k, n in counts.items() if n != 1)
        assert not twice, f"applied more than once: {twice[:10]} ({len(twice)} keys)"
        missing = feed.keys - counts.keys()
        assert not missing, f"never applied: {sorted(missing)[:10]} ({len(missing)} keys)"
        assert counts.keys() == feed.keys
        inbox = await self.pg.fetchval(
            "SELECT count(*) FROM dedup.inbox WHERE namespace = $1 AND status = 'done'",
            self.namespace,
        )
        assert inbox == len(feed.keys)
        stored = await self.stored()
        assert stored == feed.end, "stored positions are not at the ends of the partitions"
        assert not self.regressions, f"stored positions moved back: {self.regressions}"


@contextlib.asynccontextmanager
async def feeding(feed: Feed, minimum: int) -> AsyncIterator[asyncio.Task[None]]:
    """Produce while the block runs; on leaving it, finish (or, on failure, abandon) the feed."""
    task = asyncio.create_task(feed.run(minimum))
    try:
        yield task
    except BaseException:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise
    feed.stop.set()


def headers_for(key: str) -> list[tuple[str, bytes]]:
    return [("idempotency-key", key.encode()), ("content-type", b"application/json")]


async def gt(value: Awaitable[int], bound: int) -> bool:
    return await value > bound


async def true(value: bool) -> bool:
    return value


def proc_state(pid: int) -> str:
    """The process state letter from /proc (T = stopped)."""
    return processes.state(pid)
