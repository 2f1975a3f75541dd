"""Lifespan hooks in real worker processes (``consumer run --workers 2``, ``consumer worker``).

tests/apps/lifespan_app.py opens a pool at start into its container, its handler uses it,
its shutdown hook writes a marker after the drain. A failing startup hook ends the worker
with RET_STARTUP and one line, having consumed nothing.
"""

from __future__ import annotations

import os
import signal

import msgpack
import pytest

from consumer.exitcodes import RET_OK, RET_STARTUP
from scripts.toolkit import processes
from tests.conftest import create_topics, eventually

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(150)]

APP = "tests.apps.lifespan_app:app"


@pytest.fixture
async def env(settings, pg, unique, tmp_path) -> dict[str, str]:
    topic, table = f"life-{unique}", f"life_{unique}".replace("-", "_")
    await create_topics(settings, [topic, topic + ".dlq", topic + ".conflicts"], 3)
    await pg.execute(f"CREATE TABLE {table} (k text PRIMARY KEY, pid int, label text)")
    return {
        **os.environ,
        "LIFESPAN_TOPIC": topic,
        "LIFESPAN_GROUP": f"glife-{unique}",
        "LIFESPAN_TABLE": table,
        "LIFESPAN_DIR": str(tmp_path),
        "CONSUMER_FETCH_TIMEOUT_MS": "100",
        "CONSUMER_SHUTDOWN_GRACE_S": "30",
        "PYTHONUNBUFFERED": "1",
    }


async def test_two_workers_start_use_and_close_their_resources(env, pg, producer, tmp_path):
    n = 12
    for i in range(n):
        await producer.send_and_wait(
            env["LIFESPAN_TOPIC"], msgpack.packb({"id": f"j{i}"}), partition=i % 3
        )
    log = tmp_path / "run.log"
    proc = processes.spawn(
        processes.consumer_argv("run", APP, "--workers", "2", "--no-relay"), env, log
    )
    try:

        async def all_applied() -> bool:
            return await pg.fetchval(f"SELECT count(*) FROM {env['LIFESPAN_TABLE']}") == n

        async def both_started() -> bool:
            # A worker SIGTERMed while still starting (its topics checked, its hooks not yet
            # run) stops without running any hook, which is right but not what is tested here.
            return len(list(tmp_path.glob("started-*"))) == 2

        await eventually(all_applied, timeout_s=90)
        await eventually(both_started, timeout_s=90)
        proc.send_signal(signal.SIGTERM)
        assert await processes.wait_exit(proc, 60) == RET_OK, log.read_text()[-3000:]
    finally:
        processes.kill_tree(proc)
    started = {p.name.split("-")[1]: p.read_text() for p in tmp_path.glob("started-*")}
    stopped = {p.name.split("-")[1]: p.read_text() for p in tmp_path.glob("stopped-*")}
    assert len(started) == 2, log.read_text()[-3000:]  # once per worker process
    # Every worker that started ran its shutdown hook, after its drain, with its pool open.
    assert stopped == {pid: f"{label} {n}" for pid, label in started.items()}
    rows = await pg.fetch(f"SELECT pid, label FROM {env['LIFESPAN_TABLE']}")
    assert all(r["label"] == f"{started[str(r['pid'])]}/1" for r in rows)


async def test_a_failing_startup_hook_exits_with_its_code_and_consumes_nothing(
    env, pg, producer, tmp_path
):
    await producer.send_and_wait(env["LIFESPAN_TOPIC"], msgpack.packb({"id": "x"}), partition=0)
    log = tmp_path / "worker.log"
    proc = processes.spawn(
        processes.consumer_argv("worker", APP, "--id", "0", "--no-relay"),
        {**env, "LIFESPAN_FAIL": "1"},
        log,
    )
    try:
        code = await processes.wait_exit(proc, 60)
    finally:
        processes.kill_tree(proc)
    text = log.read_text()
    assert code == RET_STARTUP, text[-3000:]
    errors = [line for line in text.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "on_startup hook open_pool raised ConnectionError" in errors[0]
    assert "Traceback" not in text
    assert await pg.fetchval(f"SELECT count(*) FROM {env['LIFESPAN_TABLE']}") == 0
    assert not await pg.fetchval(
        "SELECT count(*) FROM dedup.offsets WHERE group_id = $1", env["LIFESPAN_GROUP"]
    )
    assert not list(tmp_path.glob("started-*")) and not list(tmp_path.glob("stopped-*"))
