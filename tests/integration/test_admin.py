"""``consumer inspect``, ``evict`` and ``conflicts`` against records a real worker wrote."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from consumer.constants import done_key
from consumer.exitcodes import (
    RET_ABORTED,
    RET_BUSY,
    RET_NOT_FOUND,
    RET_OK,
    RET_TOPICS,
    RET_UNCONFIRMED,
)
from scripts.toolkit import processes
from tests.apps.counting import EFFECTS_DDL
from tests.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APP = "tests.apps.counting:app"


def cli(env: dict[str, str], *argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consumer", *argv],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _spawn_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    return processes.spawn(processes.consumer_argv("worker", APP, "--no-relay"), env, log_path)


@pytest.fixture
async def recorded(settings, topics, producer, pg, unique, tmp_path):
    """k1 applied, then reused with another payload (a conflict); k2 applied."""
    topic = await topics("admin", partitions=1)
    await pg.execute(EFFECTS_DDL)
    env = {
        **os.environ,
        "COUNTING_TOPIC": topic,
        "COUNTING_GROUP": f"ga-{unique}",
        "COUNTING_RUN": unique,
        "CONSUMER_FETCH_TIMEOUT_MS": "50",
    }
    for key, n in (("k1", 1), ("k1", 2), ("k2", 3)):
        headers = [("idempotency-key", key.encode()), ("content-type", b"application/json")]
        await producer.send_and_wait(topic, json.dumps({"n": n}).encode(), headers=headers)
    await _consume_to(env, pg, 3, tmp_path / "worker.log")
    return env, f"{env['COUNTING_GROUP']}.count"


def _text(path: Path) -> str:
    return path.read_text()


async def _consume_to(env: dict[str, str], pg, offset: int, log_path: Path) -> None:
    """Run a worker until the group's stored position is ``offset``, then drain it."""
    worker = _spawn_worker(env, log_path)
    try:
        deadline = time.monotonic() + 60
        while (
            await pg.fetchval(
                "SELECT next_offset FROM dedup.offsets WHERE group_id = $1", env["COUNTING_GROUP"]
            )
            != offset
        ):
            assert time.monotonic() < deadline, _text(log_path)
            await asyncio.sleep(0.1)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == RET_OK
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


async def test_inspect_shows_the_record(recorded, pg):
    env, ns = recorded
    stored = await pg.fetchrow(
        "SELECT payload_hash, first_seen_at FROM dedup.inbox WHERE namespace = $1 AND key = 'k1'",
        ns,
    )
    done = cli(env, "inspect", APP, ns, "k1")
    assert done.returncode == RET_OK, done.stderr
    for needle in ("status", "done", stored["payload_hash"], "first seen at", "result", "1"):
        assert needle in done.stdout
    assert stored["first_seen_at"].isoformat()[:19] in done.stdout
    assert "done marker" in done.stdout and f"done:{stored['payload_hash']}" in done.stdout

    missing = cli(env, "inspect", APP, ns, "nope")
    assert missing.returncode == RET_NOT_FOUND
    assert missing.stderr.strip().splitlines() == [
        f"error: no record for namespace {ns!r}, key 'nope'"
    ]
    wrong_ns = cli(env, "inspect", APP, "other.ns", "k1")
    assert wrong_ns.returncode == RET_NOT_FOUND
    assert f"this app's namespaces: {ns}" in wrong_ns.stderr


async def test_inspect_json_has_the_fields_of_the_table(recorded, pg):
    env, ns = recorded
    stored = await pg.fetchrow(
        "SELECT payload_hash, first_seen_at FROM dedup.inbox WHERE namespace = $1 AND key = 'k1'",
        ns,
    )
    out = cli(env, "inspect", APP, ns, "k1", "--json")
    assert out.returncode == RET_OK, out.stderr
    rec = json.loads(out.stdout)
    assert (rec["namespace"], rec["key"], rec["status"]) == (ns, "k1", "done")
    assert rec["payload_hash"] == stored["payload_hash"] and rec["result"] == 1
    assert rec["first_seen_at"] == stored["first_seen_at"].isoformat()
    assert rec["first_seen_in"] == f"{env['COUNTING_TOPIC']}/0/0"  # the one location form
    assert rec["redis"]["done marker"].startswith(f"done:{stored['payload_hash']}")
    table = cli(env, "inspect", APP, ns, "k1")
    assert f"{env['COUNTING_TOPIC']}/0/0" in table.stdout


async def test_inspect_names_the_tenant_namespace_that_holds_the_key(
    recorded, pg, producer, tmp_path
):
    """k3 arrives with a tenant header: stored under ``<ns>@acme``. Asked under the bare
    name (or another tenant), inspect says where it is, in the same one line."""
    env, ns = recorded
    headers = [
        ("idempotency-key", b"k3"),
        ("tenant", b"acme"),
        ("content-type", b"application/json"),
    ]
    await producer.send_and_wait(env["COUNTING_TOPIC"], b'{"n": 4}', headers=headers)
    await _consume_to(env, pg, 4, tmp_path / "worker2.log")
    stored = await pg.fetch(
        "SELECT namespace FROM dedup.inbox WHERE key = 'k3' AND starts_with(namespace, $1)", ns
    )
    assert [r["namespace"] for r in stored] == [f"{ns}@acme"]

    for asked in (ns, f"{ns}@other"):
        missing = cli(env, "inspect", APP, asked, "k3")
        assert missing.returncode == RET_NOT_FOUND
        assert missing.stderr.strip().splitlines() == [
            f"error: no record for namespace {asked!r}, key 'k3'; "
            f"key 'k3' is stored under: {ns}@acme"
        ]
    found = cli(env, "inspect", APP, f"{ns}@acme", "k3", "--json")
    assert found.returncode == RET_OK, found.stderr
    assert json.loads(found.stdout)["result"] == 4
    # And the other way round: a tenant given for a key stored without one.
    bare = cli(env, "inspect", APP, f"{ns}@acme", "k1")
    assert bare.stderr.strip().endswith(f"key 'k1' is stored under: {ns}")


async def test_conflicts_lists_the_reused_key_with_both_hashes(recorded, pg):
    env, ns = recorded
    stored = await pg.fetchval(
        "SELECT payload_hash FROM dedup.inbox WHERE namespace = $1 AND key = 'k1'", ns
    )
    out = cli(env, "conflicts", APP, "--limit", "5")
    assert out.returncode == RET_OK, out.stderr
    assert f"recent conflicts of {env['COUNTING_GROUP']} (1)" in out.stdout
    (line,) = [line for line in out.stdout.splitlines() if stored in line]
    assert ns in line and " k1 " in line
    assert f"{env['COUNTING_TOPIC']}/0/1" in line  # the conflicting record: offset 1

    as_json = cli(env, "conflicts", APP, "--json")
    assert as_json.returncode == RET_OK, as_json.stderr
    (row,) = json.loads(as_json.stdout)
    assert (row["namespace"], row["key"], row["stored_hash"]) == (ns, "k1", stored)
    assert row["source"] == f"{env['COUNTING_TOPIC']}/0/1"


async def test_evict_asks_then_forgets_the_key_everywhere(recorded, pg):
    env, ns = recorded
    declined = cli(env, "evict", APP, ns, "k1", stdin="n\n")
    assert declined.returncode == RET_ABORTED
    assert "nothing changed" in declined.stderr
    assert await pg.fetchval("SELECT count(*) FROM dedup.inbox WHERE namespace = $1", ns) == 2

    epoch = await pg.fetchval("SELECT value FROM dedup.meta WHERE name = 'epoch'")
    r = aioredis.from_url(env["CONSUMER_REDIS_URL"])
    try:
        assert await r.exists(done_key(ns, "k1", epoch))
        done = cli(env, "evict", APP, ns, "k1", "--yes")
        assert done.returncode == RET_OK, done.stderr
        assert f"evicted {ns} / k1" in done.stdout
        assert not await r.exists(done_key(ns, "k1", epoch))
        assert await r.exists(done_key(ns, "k2", epoch))
    finally:
        await r.aclose()
    keys = await pg.fetch("SELECT key FROM dedup.inbox WHERE namespace = $1", ns)
    assert [row["key"] for row in keys] == ["k2"]
    again = cli(env, "evict", APP, ns, "k1", "--yes")
    assert again.returncode == RET_NOT_FOUND


async def test_evict_without_a_terminal_or_an_answer_asks_for_yes(recorded, pg):
    """stdin a pipe with nothing on it (a script, CI): one line naming --yes, exit 10, the
    record kept (not click's bare 130)."""
    env, ns = recorded
    out = cli(env, "evict", APP, ns, "k1", stdin="")
    assert out.returncode == RET_UNCONFIRMED, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: not a terminal and no answer: give --yes to evict; nothing changed"
    ]
    assert await pg.fetchval("SELECT count(*) FROM dedup.inbox WHERE namespace = $1", ns) == 2


async def test_evict_of_a_record_a_batch_holds_is_busy_and_changes_nothing(recorded, pg):
    """A batch holding the key's inbox row past the lock timeout: one line, RET_BUSY, the
    record (and its done marker) still there."""
    env, ns = recorded
    async with pg.transaction():  # what a running batch does to the row until it commits
        await pg.execute(
            "SELECT 1 FROM dedup.inbox WHERE namespace = $1 AND key = 'k1' FOR UPDATE", ns
        )
        busy = cli(env, "evict", APP, ns, "k1", "--yes")
    assert busy.returncode == RET_BUSY, busy.stderr
    (line,) = busy.stderr.strip().splitlines()
    assert line.startswith("error: ") and "busy" in line and "nothing changed, retry" in line
    keys = await pg.fetch("SELECT key FROM dedup.inbox WHERE namespace = $1 ORDER BY key", ns)
    assert [row["key"] for row in keys] == ["k1", "k2"]


async def test_topics_lists_checks_and_creates_the_apps_topics(settings, unique):
    from tests.conftest import create_topics

    source = f"tp-{unique}"
    await create_topics(settings, [source], partitions=2)
    env = {**os.environ, "COUNTING_TOPIC": source, "COUNTING_GROUP": f"gt-{unique}"}

    before = cli(env, "topics", APP, "--check", "--json")
    assert before.returncode == RET_TOPICS, before.stderr
    rows = {r["topic"]: r for r in json.loads(before.stdout)}
    assert rows[source]["role"] == "source" and rows[source]["partitions"] == 2
    assert rows[f"{source}.dlq"]["exists"] is False
    assert rows[f"{source}.conflicts"]["exists"] is False

    made = cli(env, "topics", APP, "--create", "--json")
    assert made.returncode == RET_OK, made.stderr
    rows = {r["topic"]: r for r in json.loads(made.stdout)}
    assert rows[f"{source}.dlq"] == {**rows[f"{source}.dlq"], "created": True, "partitions": 2}
    assert rows[f"{source}.conflicts"]["created"] is True

    after = cli(env, "topics", APP, "--check")  # the table, against the broker again
    assert after.returncode == RET_OK, after.stderr
    assert f"{source}.conflicts" in after.stdout and "MISSING" not in after.stdout


async def test_worker_no_create_topics_leaves_the_framework_topics_to_the_operator(
    settings, unique, tmp_path
):
    """``consumer worker --no-create-topics`` (as ``run`` has it): the worker starts, warns
    once that the dlq and conflicts topics are missing, and creates neither."""
    from tests.conftest import create_topics

    source = f"tn-{unique}"
    await create_topics(settings, [source], partitions=1)
    env = {**os.environ, "COUNTING_TOPIC": source, "COUNTING_GROUP": f"gn-{unique}"}
    env.pop("CONSUMER_TOPICS_CREATE", None)  # the default: create
    log_path = tmp_path / "worker.log"
    argv = processes.consumer_argv("worker", APP, "--no-relay", "--no-create-topics")
    worker = processes.spawn(argv, env, log_path)
    try:
        deadline = time.monotonic() + 60
        while "topics missing (rows to them wait in the outbox)" not in log_path.read_text():
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.1)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == RET_OK, log_path.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert f"{source}.dlq, {source}.conflicts" in log_path.read_text()
    after = cli(env, "topics", APP, "--json")
    rows = {r["topic"]: r["exists"] for r in json.loads(after.stdout)}
    assert rows == {source: True, f"{source}.dlq": False, f"{source}.conflicts": False}
