"""Redis Cluster (``CONSUMER_REDIS_CLUSTER=true``) against a real 3-node cluster.

A batch spans namespaces (handlers, tenants) whose keys live in different slots, on different
nodes. One Lua call over all of them is refused by a cluster (CROSSSLOT); the cluster store
splits every call per namespace (consumer/dedup/cluster.py). The cluster is started by
``scripts/services.sh redis-cluster-up`` (ports 16380-16382) and stopped again if this
module started it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import msgpack
import pytest
from redis.exceptions import RedisClusterException, ResponseError

from consumer import App, Context
from consumer.constants import done_key, lease_key
from consumer.dedup.cluster import ClusterLeases, redis_client
from consumer.dedup.leases import DoneMarker, RedisLeases
from schemas.payments import PaymentRequested
from tests.conftest import ROOT, app_settings, eventually, running
from tests.integration.dedup_support import cleanup, db_epoch

pytestmark = pytest.mark.integration

SCRIPT = str(ROOT / "scripts" / "services.sh")
PORT = int(os.environ.get("REDIS_CLUSTER_PORT", "16380"))


def _cluster_running() -> bool:
    probe = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(PORT), "cluster", "info"],
        capture_output=True,
        text=True,
        check=False,
    )
    return "cluster_state:ok" in probe.stdout


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    started = not _cluster_running()
    up = subprocess.run(["bash", SCRIPT, "redis-cluster-up"], capture_output=True, text=True)
    assert up.returncode == 0, up.stderr[-2000:]
    try:
        yield up.stdout.strip().splitlines()[-1]
    finally:
        if started:
            subprocess.run(["bash", SCRIPT, "redis-cluster-down"], capture_output=True, check=False)


def _spread_namespaces(n: int) -> list[str]:
    """Namespaces whose hash tags fall on each of the three nodes' slot ranges."""
    from redis.crc import key_slot

    found: dict[int, str] = {}
    i = 0
    while len(found) < 3:
        ns = f"ns{i}"
        found.setdefault(key_slot(ns.encode()) * 3 // 16384, ns)
        i += 1
    return [found[node] for node in range(3)][:n]


async def test_a_batch_across_slots_needs_the_per_namespace_split(cluster_url):
    namespaces = _spread_namespaces(3)
    idents = [(ns, f"k{j}") for ns in namespaces for j in range(3)]
    plain = RedisLeases(cluster_url, client=redis_client(cluster_url, True))
    try:
        # One script over keys of three slots: what the single-node store does, refused here.
        with pytest.raises((ResponseError, RedisClusterException)):
            await plain.acquire(idents, "tok", 5_000)
    finally:
        await plain.close()

    a, b = ClusterLeases(cluster_url, epoch="e1"), ClusterLeases(cluster_url, epoch="e1")
    try:
        assert [r.state for r in await a.acquire(idents, "tok-a", 5_000)] == ["acquired"] * 9
        assert [r.state for r in await b.acquire(idents, "tok-b", 5_000)] == ["held"] * 9
        assert await a.renew(idents, "tok-a", 5_000) == 9
        assert await b.renew(idents, "tok-b", 5_000) == 0  # not b's leases
        done = [DoneMarker(ns, k, "done", f"h-{ns}-{k}") for ns, k in idents[::2]]
        await a.finish(done, idents, "tok-a", 60)
        again = await b.acquire(idents, "tok-b", 5_000)
        for i, (ns, k) in enumerate(idents):
            if i % 2 == 0:  # a done marker answers, whatever node holds it
                assert (again[i].state, again[i].status, again[i].hash) == (
                    "done",
                    "done",
                    f"h-{ns}-{k}",
                )
            else:  # a's lease was released: b takes it
                assert again[i].state == "acquired"
        await b.finish([], idents, "tok-b", 60)
    finally:
        client = a.redis
        await client.delete(*[done_key(ns, k, "e1") for ns, k in idents[::2]])
        await a.close()
        await b.close()


async def test_worker_on_a_cluster_applies_each_key_once(
    cluster_url, settings, topics, producer, pg, unique
):
    topic = await topics("cluster", partitions=1)
    table = f"cl_{unique}"
    await pg.execute(f"CREATE TABLE {table} (tenant text, k text)")
    s = app_settings(settings, redis_url=cluster_url, redis_cluster=True, relay_enabled=False)
    app = App(f"g-{unique}", settings=s)

    @app.handler(topic, schema=PaymentRequested, key=lambda p: p.payment_id)
    async def settle(p: PaymentRequested, ctx: Context) -> str:
        await ctx.db.execute(f"INSERT INTO {table} VALUES ($1, $2)", ctx.namespace, p.payment_id)
        return "ok"

    tenants = _spread_namespaces(3)  # three tenants: three namespaces, three nodes
    sent = 0
    for _copy in range(2):
        for tenant in tenants:
            for j in range(5):
                value = msgpack.packb({"payment_id": f"p{j}", "account": "a", "cents": 1})
                await producer.send_and_wait(
                    topic, value, partition=0, headers=[("tenant", tenant.encode())]
                )
                sent += 1

    async with running(app) as worker:

        async def all_seen() -> bool:
            return worker.stats.consumed >= sent

        await eventually(all_seen)
        assert not worker.stats.redis_degraded
    rows = await pg.fetch(f"SELECT tenant, k FROM {table} ORDER BY 1, 2")
    assert len(rows) == 15 and len({(r["tenant"], r["k"]) for r in rows}) == 15
    assert worker.stats.by_outcome["applied"] == 15
    assert worker.stats.by_outcome["duplicate"] == 15
    # The done markers are in the cluster, spread over the nodes' slots.
    epoch = await db_epoch(pg)
    client = redis_client(cluster_url, True)
    try:
        names = [done_key(f"{settle.name}@{t}", f"p{j}", epoch) for t in tenants for j in range(5)]
        values = [await client.get(name) for name in names]
        assert all(v is not None and v.startswith(b"done:") for v in values), values
        await client.delete(*names[:5])
        await client.delete(*names[5:10])
        await client.delete(*names[10:])
    finally:
        await client.aclose()
    await pg.execute(f"DROP TABLE {table}")
    await cleanup(pg, unique)


async def test_no_key_moves_its_namespace_to_another_slot(cluster_url):
    """Keys may hold braces, ``:`` and ``@``; the namespace cannot (consumer/keys.py). So the
    hash tag, hence the slot, is the namespace's, as the cluster itself computes it."""
    client = redis_client(cluster_url, True)
    try:
        for ns in ("g.settle", "g.settle@org", "g.settle@org:7"):
            (slot,) = {
                await client.cluster_keyslot(name)
                for key in ("plain", "}{other}", "{other}", "a}:b", "7:inv-3", "x@y")
                for name in (lease_key(ns, key), done_key(ns, key, "e1"))
            }
            assert slot == await client.cluster_keyslot(ns)
    finally:
        await client.aclose()
