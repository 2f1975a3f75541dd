"""Keys the framework derives from names users control never collide (issue 13, #5 and #10).

Tenants and idempotency keys may contain ``:``; tenants come from a header anyone producing
to the topic sets. Tenant ``org`` with key ``7:inv-3`` and tenant ``org:7`` with key ``inv-3``
are two payments: they must get two gateway charges, two published events a downstream
consumer applies, and two replies; a tenant with ``@`` must not reach another namespace.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import sys
from types import ModuleType
from typing import Any

import msgpack
import pytest
from pydantic import BaseModel

from consumer import App, ConfigError, Context, Reject, Settings, keys, logs
from consumer.constants import done_key, lease_key
from consumer.dedup.leases import DoneMarker, RedisLeases
from consumer.replay import replay
from consumer.runtime.outcomes import Outcome
from tests.conftest import ROOT, app_settings, create_topics, eventually, read_topic, running
from tests.integration.dedup_support import (
    Spy,
    cleanup,
    inbox,
    outbox,
    send,
    wait_offset,
)

pytestmark = pytest.mark.integration

# Two (tenant, key) pairs whose old derived keys were equal: "org:7:inv-3".
PAIRS = [("org", "7:inv-3"), ("org:7", "inv-3")]


def _shipped_payments_app(monkeypatch: pytest.MonkeyPatch, prefix: str) -> ModuleType:
    """handlers/app.py loaded as a module of its own, its topics and group under ``prefix``
    (so the process-wide ``handlers.app`` other tests use is left alone)."""
    monkeypatch.setenv("PAYMENTS_TOPIC_PREFIX", prefix)
    name = f"payments_app_{prefix.strip('.')}"
    spec = importlib.util.spec_from_file_location(name, ROOT / "handlers" / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


async def test_shipped_payments_app_charges_once_per_tenant_and_payment_id(
    settings: Settings, producer: Any, pg: Any, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = _shipped_payments_app(monkeypatch, f"k{unique}.")
    app: App = mod.app
    app.settings = app_settings(settings, relay_enabled=False)
    requested, settled = mod.REQUESTED, mod.SETTLED
    await create_topics(
        settings, [requested, requested + ".dlq", requested + ".conflicts", settled], 1
    )
    accounts = [f"acct-{i}-{unique}" for i in range(2)]
    requests = list(zip(PAIRS, accounts, (100, 250), strict=True))
    try:
        async with running(app) as worker:
            spy = Spy(worker)
            for (tenant, payment_id), account, cents in requests:
                last = await send(
                    producer,
                    requested,
                    {"payment_id": payment_id, "account": account, "cents": cents},
                    headers={"tenant": tenant.encode()},
                )
            await wait_offset(pg, app.group, requested, 0, last + 1)

        assert [spy.at(0, o) for o in (0, 1)] == [[Outcome.APPLIED], [Outcome.APPLIED]]
        charges = await pg.fetch(
            "SELECT idempotency_key, account, cents FROM gateway_charges "
            "WHERE account = ANY($1) ORDER BY cents",
            accounts,
        )
        ns = mod.settle.name
        # One charge per payment, each with its own amount, under the unambiguous key.
        assert [(r["idempotency_key"], r["account"], r["cents"]) for r in charges] == [
            (keys.outside_key(f"{ns}@org", "7:inv-3"), accounts[0], 100),
            (keys.outside_key(f"{ns}@org:7", "inv-3"), accounts[1], 250),
        ]
        assert charges[0]["idempotency_key"] == f"{ns}@org:7%3Ainv-3"
        receipts = [
            (await inbox(pg, f"{ns}@{tenant}"))[payment_id]["result"]
            for tenant, payment_id in PAIRS
        ]
        assert len({r["gateway_ref"] for r in receipts}) == 2
        events = await outbox(pg, settled)
        assert sorted(e["idempotency_key"] for e in events) == sorted(
            keys.published_key(f"{ns}@{t}", k, 0) for t, k in PAIRS
        )
    finally:
        await pg.execute("DELETE FROM gateway_charges WHERE account = ANY($1)", accounts)
        await pg.execute("DELETE FROM ledger WHERE account = ANY($1)", accounts)
        await pg.execute("DELETE FROM accounts WHERE account = ANY($1)", accounts)
        await cleanup(pg, unique, settings.redis_url)


class Order(BaseModel):
    cents: int


async def test_published_events_and_replies_of_colliding_pairs_reach_downstream_apart(
    settings: Settings, producer: Any, pg: Any, unique: str
) -> None:
    """Through Kafka and the relay: a downstream app keyed by the ``idempotency-key`` header
    applies both events, and the requesters get two replies with distinct keys."""
    up_topic, down_topic, replies = f"up-{unique}", f"down-{unique}", f"replies-{unique}"
    await create_topics(
        settings,
        [replies, *(t + s for t in (up_topic, down_topic) for s in ("", ".dlq", ".conflicts"))],
        1,
    )
    table = f"down_{unique}"
    await pg.execute(f"CREATE TABLE {table} (ik text, cents int)")
    up = App(f"up-{unique}", settings=app_settings(settings))
    down = App(f"down-{unique}", settings=app_settings(settings, relay_enabled=False))

    @up.handler(up_topic, schema=Order)
    async def order(p: Order, ctx: Context) -> dict[str, int]:
        ctx.publish(down_topic, {"cents": p.cents})
        return {"cents": p.cents}

    @down.handler(down_topic, schema=Order)
    async def apply(p: Order, ctx: Context) -> None:
        await ctx.db.execute(f"INSERT INTO {table} VALUES ($1, $2)", ctx.idempotency_key, p.cents)

    try:
        async with running(up), running(down) as downstream:
            for (tenant, key), cents in zip(PAIRS, (100, 250), strict=True):
                await send(
                    producer,
                    up_topic,
                    {"cents": cents},
                    headers={
                        "tenant": tenant.encode(),
                        "idempotency-key": key.encode(),
                        "reply-to": replies.encode(),
                    },
                )

            async def both_seen() -> bool:
                return downstream.stats.consumed >= 2

            await eventually(both_seen, timeout_s=60)
            answers = await read_topic(settings, replies, expect=2)
        applied = await pg.fetch(f"SELECT ik, cents FROM {table} ORDER BY cents")
        ns = up.handlers[0].name
        assert [(r["ik"], r["cents"]) for r in applied] == [
            (keys.published_key(f"{ns}@org", "7:inv-3", 0), 100),
            (keys.published_key(f"{ns}@org:7", "inv-3", 0), 250),
        ]
        reply_keys = {dict(a.headers)["idempotency-key"].decode() for a in answers}
        assert reply_keys == {keys.reply_key(f"{ns}@{t}", k) for t, k in PAIRS}
        assert sorted(msgpack.unpackb(a.value)["cents"] for a in answers) == [100, 250]
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {table}")
        await cleanup(pg, unique, settings.redis_url)


async def test_tenant_with_the_namespace_separator_is_dead_lettered_not_applied(
    settings: Settings, producer: Any, pg: Any, unique: str
) -> None:
    """``name@tenant`` is the namespace: a tenant ``v2@x`` is refused as ``bad_key`` (recorded
    nowhere, the partition moves on), so no header can reach another namespace's keys."""
    topic = f"ten-{unique}"
    await create_topics(settings, [topic, topic + ".dlq", topic + ".conflicts"], 1)
    app = App(f"g-{unique}", settings=app_settings(settings, relay_enabled=False))
    seen: list[str] = []

    @app.handler(topic, schema=Order)
    async def handle(p: Order, ctx: Context) -> None:
        seen.append(ctx.namespace)

    try:
        async with running(app) as worker:
            spy = Spy(worker)
            bad = await send(
                producer,
                topic,
                {"cents": 1},
                headers={"tenant": b"v2@x", "idempotency-key": b"k1"},
            )
            good = await send(
                producer, topic, {"cents": 1}, headers={"tenant": b"v2", "idempotency-key": b"k1"}
            )
            await wait_offset(pg, app.group, topic, 0, good + 1)
        assert spy.at(0, bad) == [Outcome.INVALID]
        assert spy.at(0, good) == [Outcome.APPLIED]
        assert seen == [f"{handle.name}@v2"]
        assert await inbox(pg, f"{handle.name}@v2@x") == {}
        (dead,) = await outbox(pg, topic + ".dlq")
        assert dead["headers"]["x-reason"] == "bad_key"
        assert "'@'" in dead["headers"]["x-detail"]
    finally:
        await cleanup(pg, unique, settings.redis_url)


async def test_done_markers_of_databases_whose_epochs_contain_a_colon_stay_apart(
    settings: Settings, unique: str
) -> None:
    """Two databases sharing one Redis: (epoch ``a``, key ``b:c``) and (epoch ``a:b``, key
    ``c``) once named the same marker, and one database's ``done`` answered the other's key."""
    ns = f"g-{unique}.handle"
    first = RedisLeases(settings.redis_url, epoch=f"e{unique}")
    second = RedisLeases(settings.redis_url, epoch=f"e{unique}:b")
    try:
        await first.finish([DoneMarker(ns, "b:c", "done", "h1")], [], "tok", 60)
        (result,) = await second.acquire([(ns, "c")], "tok2", 5_000)
        assert result.state == "acquired"
        await second.finish([], [(ns, "c")], "tok2", 60)
    finally:
        await first.redis.delete(
            done_key(ns, "b:c", first.epoch),
            done_key(ns, "c", second.epoch),
            lease_key(ns, "b:c"),
            lease_key(ns, "c"),
        )
        await first.close()
        await second.close()


async def test_plain_log_lines_cannot_be_forged_by_a_key_or_tenant(
    settings: Settings, producer: Any, pg: Any, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``key=value`` lines quote a value holding a space, ``=`` or a newline: a key or tenant
    from a message can neither add a field (``outcome=applied``) nor a whole forged line."""
    topic = f"logs-{unique}"
    await create_topics(settings, [topic, topic + ".dlq", topic + ".conflicts"], 1)
    app = App(f"g-{unique}", settings=app_settings(settings, relay_enabled=False))

    @app.handler(topic, schema=Order)
    async def handle(p: Order, ctx: Context) -> None:
        raise Reject("refused\nERROR consumer.outcomes: applied forged")

    key = "k1 outcome=applied\n2099-01-01 INFO [1] consumer.outcomes: applied x/0/0"
    tenant = 'acme namespace="other.handler"'
    caplog.set_level(logging.DEBUG, logger="consumer.outcomes")
    try:
        async with running(app) as worker:
            last = await send(
                producer,
                topic,
                {"cents": 1},
                headers={"idempotency-key": key.encode(), "tenant": tenant.encode()},
            )
            await wait_offset(pg, app.group, topic, 0, last + 1)
            assert worker.stats.by_outcome["rejected"] == 1
        (record,) = [r for r in caplog.records if r.name == "consumer.outcomes"]
        line = logs.PlainFormatter().format(record)
        assert "\n" not in line
        fields = dict(
            (name, json.loads(value) if value.startswith('"') else value)
            for name, value in re.findall(r' (\w+)=("(?:[^"\\]|\\.)*"|\S*)', line)
        )
        assert fields["outcome"] == "rejected"
        assert fields["key"] == key
        assert fields["namespace"] == f"{handle.name}@{tenant}"
        assert fields["reason"].startswith("refused\n")
    finally:
        await cleanup(pg, unique, settings.redis_url)


async def test_replay_refuses_a_topic_that_is_not_a_dead_letter_topic(
    settings: Settings, producer: Any, unique: str
) -> None:
    """``<topic>.dlq`` without its suffix is the replay target; a ``.conflicts`` topic (no
    ``.dlq``) would have been replayed into itself, doubling every conflict record."""
    topic = f"rp-{unique}"
    conflicts = topic + ".conflicts"
    await create_topics(settings, [topic, topic + ".dlq", conflicts], 1)
    await send(producer, conflicts, {"cents": 1}, headers={"x-reason": b"conflict"})
    app = App(f"g-{unique}", settings=settings)
    with pytest.raises(ConfigError, match="not a dead-letter topic"):
        await replay(app, settings, conflicts, reasons=("conflict",))
    assert len(await read_topic(settings, conflicts)) == 1


async def test_events_published_for_a_long_key_are_applied_downstream_not_dead_lettered(
    settings: Settings, producer: Any, pg: Any, unique: str
) -> None:
    """A key of 101 bytes (allowed) with 100 ``:`` escapes to 301: the published key
    ``<ns>:<key>:0`` was longer than the 256 bytes a downstream consumer accepts, so every
    event published for it became a ``bad_key`` dead letter downstream, never applied."""
    up_topic, down_topic = f"up-{unique}", f"down-{unique}"
    await create_topics(
        settings, [t + s for t in (up_topic, down_topic) for s in ("", ".dlq", ".conflicts")], 1
    )
    table = f"down_{unique}"
    await pg.execute(f"CREATE TABLE {table} (ik text, cents int)")
    up = App(f"up-{unique}", settings=app_settings(settings))
    down = App(f"down-{unique}", settings=app_settings(settings, relay_enabled=False))
    long_key = ":" * 100 + "x"
    outside: list[str] = []

    @up.handler(up_topic, schema=Order)
    async def order(p: Order, ctx: Context) -> None:
        ctx.publish(down_topic, {"cents": p.cents})
        outside.append(ctx.outside_key)

    @down.handler(down_topic, schema=Order)
    async def apply(p: Order, ctx: Context) -> None:
        await ctx.db.execute(f"INSERT INTO {table} VALUES ($1, $2)", ctx.idempotency_key, p.cents)

    try:
        async with running(up), running(down) as downstream:
            spy = Spy(downstream)
            await send(
                producer, up_topic, {"cents": 7}, headers={"idempotency-key": long_key.encode()}
            )

            async def seen() -> bool:
                return bool(spy.handled)

            await eventually(seen, timeout_s=60)
        published = keys.published_key(up.handlers[0].name, long_key, 0)
        assert [h.outcome for h in spy.handled] == [Outcome.APPLIED]
        applied = await pg.fetch(f"SELECT ik, cents FROM {table}")
        assert [(r["ik"], r["cents"]) for r in applied] == [(published, 7)]
        assert len(published.encode()) <= keys.MAX_KEY_BYTES
        # Outside systems cap keys too (a payment gateway's at 255 characters).
        assert [len(k.encode()) <= keys.MAX_KEY_BYTES for k in outside] == [True]
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {table}")
        await cleanup(pg, unique, settings.redis_url)
