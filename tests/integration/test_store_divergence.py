"""Redis keeps what PostgreSQL lost (or was told to forget): Redis must never decide.

Each test makes Redis hold a done marker for a key the inbox does not have — PostgreSQL
restored from an earlier pg_dump, promoted from a lagging standby, an ``evict`` racing a
duplicate's re-warm, a Redis snapshot restored after an ``evict``, an epoch changed under a
running worker — and asserts the outcome in the stores: the key is applied exactly once, by
effect rows (a table without a unique constraint) and inbox rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from consumer import App, Context, Settings
from consumer.cli.records import evict_record
from consumer.db.migrate import migrate_dsn
from consumer.dedup.leases import RedisLeases
from consumer.runtime.batch import BatchProcessor, pg_transaction
from consumer.runtime.outcomes import Outcome
from consumer.testing.faults import Calling
from tests.conftest import APP_MIGRATIONS, app_settings, eventually, running
from tests.integration.dedup_support import (
    Pay,
    Spy,
    cleanup,
    db_epoch,
    direct_env,
    record,
    redis_keys,
    send,
    wait_offset,
)

pytestmark = pytest.mark.integration

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
EFFECTS = "CREATE TABLE IF NOT EXISTS store_effects (k text NOT NULL, attempt int NOT NULL)"


def _dsn_for(dsn: str, database: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{database}"


def _pg_tool(tool: str, *argv: str) -> None:
    path = PG_BIN / tool
    exe = str(path) if path.exists() else shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} not found (set PG_BIN)")
    done = subprocess.run([exe, *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{tool} failed: {done.stderr}"


@contextlib.asynccontextmanager
async def own_database(settings: Settings, name: str) -> AsyncIterator[str]:
    """A migrated database of this test's own (a restore replaces all of it); its DSN."""
    admin = await asyncpg.connect(settings.postgres_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        dsn = _dsn_for(settings.postgres_dsn, name)
        await migrate_dsn(dsn, APP_MIGRATIONS)
        yield dsn
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def effects_app(group: str, settings: Settings, topic: str, calls: list[str]) -> App:
    app = App(group, settings=settings)

    @app.handler(topic, schema=Pay, key=lambda p: p.id)
    async def settle(p: Pay, ctx: Context) -> str:
        calls.append(p.id)
        await ctx.db.execute(
            "INSERT INTO store_effects (k, attempt) VALUES ($1, $2)", p.id, ctx.attempt
        )
        return f"settled {p.id}"

    return app


async def effect_counts(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT k, count(*) FROM store_effects GROUP BY k")
    return {r[0]: int(r[1]) for r in rows}


async def test_records_lost_by_a_restored_dump_are_applied_once_with_redis_kept(
    settings, topics, producer, unique, tmp_path
):
    """pg_dump, more records applied (their done markers stay in Redis), the database dropped
    and restored from the dump under the same name: the worker re-reads the lost records from
    Kafka and applies each once; a copy of a record the dump kept stays a duplicate."""
    topic = await topics("restore", partitions=1)
    name = f"restore_{unique}"
    dump = tmp_path / "before.dump"
    async with own_database(settings, name) as dsn:
        s = app_settings(settings, postgres_dsn=dsn, relay_enabled=False)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(EFFECTS)
        finally:
            await conn.close()
        calls: list[str] = []
        group = f"g-{unique}"
        app = effects_app(group, s, topic, calls)

        async def run_sending(keys: list[str], next_offset: int) -> Spy:
            """Run a worker, send ``keys`` once it is watched, wait for ``next_offset``."""
            check = await asyncpg.connect(dsn)
            try:
                async with running(app) as worker:
                    spy = Spy(worker)
                    for k in keys:
                        await send(producer, topic, {"id": k})
                    await wait_offset(check, group, topic, 0, next_offset)
                return spy
            finally:
                await check.close()

        await run_sending(["k1", "k2"], 2)
        _pg_tool("pg_dump", "-Fc", "-f", str(dump), "-d", dsn)

        await run_sending(["k3", "k4"], 4)
        epoch = await _epoch_of(dsn)
        redis = RedisLeases(settings.redis_url)
        try:
            ns = f"{group}.settle"
            markers = [n for n in redis_keys(ns, ["k3", "k4"], epoch) if n.startswith("done:")]
            assert await redis.redis.exists(*markers) == 2  # Redis remembers k3 and k4

            # The database loses k3 and k4: dropped and restored from the dump, same name.
            admin = await asyncpg.connect(settings.postgres_dsn)
            try:
                await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
                await admin.execute(f'CREATE DATABASE "{name}"')
            finally:
                await admin.close()
            _pg_tool("pg_restore", "-d", dsn, str(dump))
            conn = await asyncpg.connect(dsn)
            try:
                assert await effect_counts(conn) == {"k1": 1, "k2": 1}
                assert await db_epoch(conn) == epoch  # the restore kept the epoch
            finally:
                await conn.close()
            assert await redis.redis.exists(*markers) == 2  # and Redis kept its markers

            # k3 and k4 are re-read from the restored position; then a copy of k1 (offset 4).
            spy = await run_sending(["k1"], 5)
            conn = await asyncpg.connect(dsn)
            try:
                counts = await effect_counts(conn)
                inbox = {
                    r[0]: r[1]
                    for r in await conn.fetch(
                        "SELECT key, status FROM dedup.inbox WHERE namespace = $1", ns
                    )
                }
            finally:
                await conn.close()
        finally:
            await redis.redis.delete(
                *redis_keys(f"{group}.settle", ["k1", "k2", "k3", "k4"], epoch)
            )
            await redis.close()
    assert spy.at(0, 4) == [Outcome.DUPLICATE]
    assert counts == {"k1": 1, "k2": 1, "k3": 1, "k4": 1}
    assert inbox == {"k1": "done", "k2": "done", "k3": "done", "k4": "done"}


async def _epoch_of(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return await db_epoch(conn)
    finally:
        await conn.close()


# ------------------------------------------------------------------ evict and snapshots


def _processor(app: App, env: dict[str, Any], leases: RedisLeases, fault: Any) -> BatchProcessor:
    begin = lambda: pg_transaction(env["pool"])  # noqa: E731
    return BatchProcessor(app, env["settings"], leases, "tok", begin, probe=Calling(fault))


@pytest.fixture
async def evict_env(settings, pg, unique) -> AsyncIterator[dict[str, Any]]:
    await pg.execute(EFFECTS)
    async with direct_env(settings, pg, unique, "evict") as env:
        epoch = await db_epoch(pg)
        leases = RedisLeases(settings.redis_url, epoch=epoch)
        calls: list[str] = []
        app = effects_app(env["group"], env["settings"], env["topic"], calls)
        ns = f"{env['group']}.settle"
        env.update(app=app, leases=leases, calls=calls, ns=ns, epoch=epoch, key=f"k-{unique}")
        try:
            yield env
        finally:
            await leases.redis.delete(*redis_keys(ns, [env["key"]], epoch))
            await pg.execute("DELETE FROM store_effects WHERE k = $1", env["key"])
            await leases.close()


async def _no_fault(name: str) -> None:
    return None


async def test_evict_during_a_postgres_answered_duplicate_leaves_no_marker_that_answers(
    evict_env, pg
):
    """A duplicate answered from the inbox re-warms the done marker after its commit; an
    ``evict`` between that commit and the re-warm deletes the record and the old marker. The
    next copy must run the handler (the key was forgotten), not be answered by the marker."""
    env = evict_env
    key, ns, topic = env["key"], env["ns"], env["topic"]
    evicted: list[int] = []

    async def evict_after_commit(name: str) -> None:
        if name == "after_commit" and not evicted:
            evicted.append(await evict_record(env["settings"], ns, key, env["epoch"]))

    first = await _processor(env["app"], env, env["leases"], _no_fault).process(
        [record(topic, 0, {"id": key})]
    )
    assert [h.outcome for h in first.handled] == [Outcome.APPLIED]
    # The marker is gone (expired, Redis restarted): the next copy is answered by the inbox.
    marker = next(n for n in redis_keys(ns, [key], env["epoch"]) if n.startswith("done:"))
    assert await env["leases"].redis.delete(marker) == 1

    racing = _processor(env["app"], env, env["leases"], evict_after_commit)
    dup = await racing.process([record(topic, 1, {"id": key})])
    assert [h.outcome for h in dup.handled] == [Outcome.DUPLICATE]
    assert evicted == [1]
    assert await pg.fetchval("SELECT count(*) FROM dedup.inbox WHERE namespace = $1", ns) == 0

    again = await _processor(env["app"], env, env["leases"], _no_fault).process(
        [record(topic, 2, {"id": key})]
    )
    assert [h.outcome for h in again.handled] == [Outcome.APPLIED]
    assert env["calls"] == [key, key]
    assert await pg.fetchval("SELECT count(*) FROM store_effects WHERE k = $1", key) == 2
    assert (
        await pg.fetchval(
            "SELECT status FROM dedup.inbox WHERE namespace = $1 AND key = $2", ns, key
        )
        == "done"
    )


async def test_a_marker_restored_from_a_redis_snapshot_after_evict_does_not_answer(evict_env, pg):
    """Redis restored from a snapshot taken before an ``evict`` brings the key's done marker
    back (emulated key by key with DUMP/RESTORE, the RDB encoding): the inbox has no record,
    so the next copy runs the handler."""
    env = evict_env
    key, ns, topic = env["key"], env["ns"], env["topic"]
    processor = _processor(env["app"], env, env["leases"], _no_fault)
    first = await processor.process([record(topic, 0, {"id": key})])
    assert [h.outcome for h in first.handled] == [Outcome.APPLIED]
    marker = next(n for n in redis_keys(ns, [key], env["epoch"]) if n.startswith("done:"))
    r = env["leases"].redis
    snapshot = await r.dump(marker)
    assert snapshot is not None
    assert await evict_record(env["settings"], ns, key, env["epoch"]) == 1
    assert not await r.exists(marker)
    await r.restore(marker, 60_000, snapshot)  # the snapshot is loaded back

    again = await processor.process([record(topic, 1, {"id": key})])
    assert [h.outcome for h in again.handled] == [Outcome.APPLIED]
    assert await pg.fetchval("SELECT count(*) FROM store_effects WHERE k = $1", key) == 2
    dup = await processor.process([record(topic, 2, {"id": key})])
    assert [h.outcome for h in dup.handled] == [Outcome.DUPLICATE]
    assert await pg.fetchval("SELECT count(*) FROM store_effects WHERE k = $1", key) == 2


async def test_a_worker_keeps_its_start_epoch_and_still_applies_what_the_inbox_lacks(
    settings, topics, producer, pg, unique
):
    """Workers read the epoch when they start (confirmed: ``Worker._leases``). The documented
    restore remedy changes the epoch; a worker not restarted keeps the old one, and a marker
    under it for a key the inbox lacks must still not answer."""
    await pg.execute(EFFECTS)
    topic = await topics("epoch-run", partitions=1)
    group = f"g-{unique}"
    calls: list[str] = []
    s = app_settings(settings, relay_enabled=False)
    app = effects_app(group, s, topic, calls)
    ns = f"{group}.settle"
    key = f"k-{unique}"
    old = await db_epoch(pg)
    try:
        async with running(app) as worker:
            spy = Spy(worker)
            a = await send(producer, topic, {"id": key})
            await wait_offset(pg, group, topic, 0, a + 1)
            # The database loses the record (as a restore would) and gets a new epoch, as
            # docs/operations.md says to do after a restore; the worker is not restarted.
            await pg.execute("DELETE FROM dedup.inbox WHERE namespace = $1", ns)
            await pg.execute("UPDATE dedup.meta SET value = $1 WHERE name = 'epoch'", f"e{unique}")
            assert worker.processor is not None
            assert getattr(worker.processor.leases, "epoch", None) == old  # read at start
            b = await send(producer, topic, {"id": key})
            await wait_offset(pg, group, topic, 0, b + 1)
    finally:
        await pg.execute("UPDATE dedup.meta SET value = $1 WHERE name = 'epoch'", old)
        leases = RedisLeases(settings.redis_url)
        try:
            await leases.redis.delete(*redis_keys(ns, [key], old))
        finally:
            await leases.close()
        await pg.execute("DELETE FROM store_effects WHERE k = $1", key)
        await cleanup(pg, unique)
    assert spy.at(0, b) == [Outcome.APPLIED]
    assert calls == [key, key]


async def test_a_stored_position_behind_kafkas_commit_skips_nothing(
    settings, topics, producer, pg, unique, monkeypatch
):
    """PostgreSQL's stored position is behind Kafka's committed offset (the database restored
    or failed over, Kafka kept its commits). A fetch from the committed position can return
    before the worker's seek to the stored one; processing those records would move the
    stored position past the records in between, lost without a trace. Redis is off: this is
    about positions alone. The seek is made to wait for that fetch, so the race is forced."""
    from aiokafka import AIOKafkaConsumer

    from consumer.runtime.worker import Worker

    await pg.execute(EFFECTS)
    topic = await topics("behind", partitions=1)
    group = f"g-{unique}"
    calls: list[str] = []
    s = app_settings(settings, relay_enabled=False, redis_mode="off")
    app = effects_app(group, s, topic, calls)
    ns = f"{group}.settle"
    keys = [f"a{i}-{unique}" for i in range(5)]
    try:
        async with running(app):
            for k in keys[:4]:
                await send(producer, topic, {"id": k})
            await wait_offset(pg, group, topic, 0, 4)
        # The database loses the last two records; Kafka's committed offset stays at 4.
        await pg.execute(
            "DELETE FROM dedup.inbox WHERE namespace = $1 AND key = ANY($2)", ns, keys[2:4]
        )
        await pg.execute("DELETE FROM store_effects WHERE k = ANY($1)", keys[2:4])
        await pg.execute("UPDATE dedup.offsets SET next_offset = 2 WHERE group_id = $1", group)
        await send(producer, topic, {"id": keys[4]})

        fetched = asyncio.Event()
        original = AIOKafkaConsumer.getmany

        async def getmany(self: Any, *tps: Any, **kw: Any) -> Any:
            out = await original(self, *tps, **kw)
            if out:
                fetched.set()
            return out

        class SeekAfterFetch(Worker):
            async def seek_to_stored(self, tps: list[Any]) -> None:
                await asyncio.wait_for(fetched.wait(), 30)  # the fetch came back first
                await super().seek_to_stored(tps)

        monkeypatch.setattr(AIOKafkaConsumer, "getmany", getmany)
        worker = SeekAfterFetch(app, s)
        task = asyncio.create_task(worker.run())
        try:
            await wait_offset(pg, group, topic, 0, 5)
        finally:
            worker.stop.set()
            await asyncio.wait_for(task, 60)
        counts = dict(
            await pg.fetch(
                "SELECT k, count(*) FROM store_effects WHERE k = ANY($1) GROUP BY k", keys
            )
        )
    finally:
        await pg.execute("DELETE FROM store_effects WHERE k = ANY($1)", keys)
        await cleanup(pg, unique)
    assert counts == dict.fromkeys(keys, 1)


# The standby listens next to the primary (services.sh leaves PG_PORT + 1 free) unless told.
_PRIMARY_PORT = urlsplit(os.environ.get("CONSUMER_POSTGRES_DSN", "")).port or 15432
STANDBY_PORT = int(os.environ.get("PG_STANDBY_PORT", "") or _PRIMARY_PORT + 1)


def _as_pg(*argv: str) -> list[str]:
    """Run a PostgreSQL server tool as the cluster's OS user (services.sh: root runs as it)."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)


@contextlib.contextmanager
def lagging_standby(settings: Settings, port: int) -> Any:
    """A streaming standby of the test server on ``port`` (pg_basebackup -R). Yields a
    ``cut_and_promote()`` that stops it, lets it restart without its primary (so it misses
    whatever the primary commits meanwhile: call it, then commit) and returns a ``promote()``
    that makes it a primary on its own timeline. Stopped and deleted on exit."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="standby-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    host_port = settings.postgres_dsn.split("@")[-1].split("/")[0]
    host, _, primary_port = host_port.rpartition(":")
    ctl = str(PG_BIN / "pg_ctl")
    # max_connections: a standby needs at least the primary's, which may come from the
    # primary's command line (the containers of --services=containers) and not its files
    opts = (
        f"-p {port} -c unix_socket_directories={sock} -c listen_addresses=127.0.0.1"
        " -c max_connections=1000"
    )

    def run(*argv: str) -> None:
        done = subprocess.run(_as_pg(*argv), capture_output=True, text=True, timeout=120, cwd="/")
        assert done.returncode == 0, f"{argv[0]}: {done.stdout} {done.stderr}"

    run(
        str(PG_BIN / "pg_basebackup"),
        "-h",
        host,
        "-p",
        primary_port,
        "-U",
        "postgres",
        "-D",
        str(data),
        "-R",
        "-X",
        "stream",
        "-c",
        "fast",
    )
    run(ctl, "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "start")

    def cut() -> Any:
        run(ctl, "-D", str(data), "-m", "fast", "-w", "stop")
        auto = data / "postgresql.auto.conf"
        auto.write_text(
            "".join(x for x in auto.read_text().splitlines(True) if "primary_conninfo" not in x)
        )
        run(ctl, "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "start")

        def promote() -> None:
            run(ctl, "-D", str(data), "-w", "promote")

        return promote

    try:
        yield cut
    finally:
        subprocess.run(
            _as_pg(ctl, "-D", str(data), "-m", "immediate", "-w", "stop"),
            capture_output=True,
            cwd="/",
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
async def test_failover_to_a_lagging_standby_applies_the_lost_tail_once_with_redis_kept(
    settings, topics, producer, unique
):
    """A streaming standby stops receiving (an asynchronous replica that lags), the primary
    applies k3 and k4 (their markers in Redis), then the standby is promoted and the workers
    move to it: k3 and k4, missing there, are re-read from Kafka and applied once."""
    topic = await topics("failover", partitions=1)
    name = f"failover_{unique}"
    async with own_database(settings, name) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(EFFECTS)
        finally:
            await conn.close()
        group = f"g-{unique}"
        calls: list[str] = []
        ns = f"{group}.settle"
        epoch = await _epoch_of(dsn)

        async def run_on(target: str, keys: list[str], next_offset: int) -> Spy:
            app = effects_app(
                group,
                app_settings(settings, postgres_dsn=target, relay_enabled=False),
                topic,
                calls,
            )
            check = await asyncpg.connect(target)
            try:
                async with running(app) as worker:
                    spy = Spy(worker)
                    for k in keys:
                        await send(producer, topic, {"id": k})
                    await wait_offset(check, group, topic, 0, next_offset)
                return spy
            finally:
                await check.close()

        redis = RedisLeases(settings.redis_url)
        try:
            with lagging_standby(settings, STANDBY_PORT) as cut:
                await run_on(dsn, ["k1", "k2"], 2)
                standby = f"postgresql://postgres@127.0.0.1:{STANDBY_PORT}/{name}"
                primary = await asyncpg.connect(dsn)
                try:  # the standby has everything up to here, then loses its primary
                    lsn = await primary.fetchval("SELECT pg_current_wal_lsn()::text")
                finally:
                    await primary.close()
                replica = await asyncpg.connect(standby)
                try:

                    async def caught_up() -> bool:
                        return bool(
                            await replica.fetchval(
                                "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn
                            )
                        )

                    await eventually(caught_up)
                finally:
                    await replica.close()
                promote = cut()
                await run_on(dsn, ["k3", "k4"], 4)  # committed on the primary only
                promote()
                spy = await run_on(standby, ["k1"], 5)
                conn = await asyncpg.connect(standby)
                try:
                    counts = await effect_counts(conn)
                finally:
                    await conn.close()
        finally:
            await redis.redis.delete(*redis_keys(ns, ["k1", "k2", "k3", "k4"], epoch))
            await redis.close()
    assert spy.at(0, 4) == [Outcome.DUPLICATE]
    assert counts == {"k1": 1, "k2": 1, "k3": 1, "k4": 1}


async def test_a_partition_without_a_stored_position_starts_at_the_log_start(
    settings, topics, producer, pg, unique
):
    """PostgreSQL lost every commit of a partition (restored from a dump taken before its
    first batch, failed over to a standby that never got it): no stored position at all,
    while Kafka kept the committed offset of the lost commits. The database wins: a partition
    it has no position for has had nothing processed, so it is read from the log start, not
    from Kafka's committed offset (which would skip the lost records without a trace)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    await pg.execute(EFFECTS)
    topic = await topics("nopos", partitions=1)
    group = f"g-{unique}"
    calls: list[str] = []
    s = app_settings(settings, relay_enabled=False, redis_mode="off")
    app = effects_app(group, s, topic, calls)
    ns = f"{group}.settle"
    keys = [f"n{i}-{unique}" for i in range(4)]
    try:
        async with running(app):
            for k in keys[:3]:
                await send(producer, topic, {"id": k})
            await wait_offset(pg, group, topic, 0, 3)
        # Kafka's committed offset for the group is 3 (committed again here, so the test does
        # not depend on the worker's post-commit Kafka commit having landed before it stopped).
        tp = TopicPartition(topic, 0)
        kc = AIOKafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap, group_id=group, enable_auto_commit=False
        )
        await kc.start()
        try:
            kc.assign([tp])
            await kc.commit({tp: 3})
            assert await kc.committed(tp) == 3
        finally:
            await kc.stop()
        # The database loses everything of the partition: records, effects, stored position.
        await pg.execute("DELETE FROM dedup.inbox WHERE namespace = $1", ns)
        await pg.execute("DELETE FROM store_effects WHERE k = ANY($1)", keys)
        await pg.execute("DELETE FROM dedup.offsets WHERE group_id = $1", group)
        await send(producer, topic, {"id": keys[3]})
        async with running(app):
            await wait_offset(pg, group, topic, 0, 4)
        counts = dict(
            await pg.fetch(
                "SELECT k, count(*) FROM store_effects WHERE k = ANY($1) GROUP BY k", keys
            )
        )
    finally:
        await pg.execute("DELETE FROM store_effects WHERE k = ANY($1)", keys)
        await cleanup(pg, unique)
    assert counts == dict.fromkeys(keys, 1)
