"""Issue 13 #6 against real Kafka, Redis and PostgreSQL: the payload hash covers what the
handler uses, JSON amounts are exact, a schema may gain defaulted fields, and records made
before the canonical-form upgrade keep answering, and payloads the handler tells apart (digits
past 28, an extra named like an aliased field, union members) never read alike.

Each test runs a Worker on its own topic, group and effects table and asserts what was
committed: effect rows (no unique constraint: a second apply shows as a second row), inbox
records, and the outcome of each record.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from consumer import App, Context, Message
from consumer.constants import done_key
from consumer.dedup.hashing import payload_hash
from consumer.runtime.outcomes import Outcome
from tests.conftest import app_settings, running
from tests.integration.dedup_support import (
    Spy,
    cleanup,
    db_epoch,
    direct_env,
    direct_processor,
    drive,
    inbox,
    record,
    send,
    wait_offset,
)

pytestmark = pytest.mark.integration

APPLIED, DUPLICATE, CONFLICT = Outcome.APPLIED, Outcome.DUPLICATE, Outcome.CONFLICT


class Charge(BaseModel):
    id: str
    card: SecretStr
    iban: str = Field(default="", exclude=True)  # kept out of dumps, used by the handler
    amount: Decimal = Decimal(0)


@pytest.fixture
async def env(settings, topics, pg, unique) -> AsyncIterator[dict[str, Any]]:
    topic = await topics("hash")
    table = f"eff_{unique}"
    await pg.execute(f"CREATE TABLE {table} (k text, v text)")
    s = app_settings(settings, relay_enabled=False, retry_backoff_ms=20, retry_backoff_max_ms=200)
    try:
        yield {"topic": topic, "table": table, "group": f"g-{unique}", "settings": s, "pg": pg}
    finally:
        await pg.execute(f"DROP TABLE IF EXISTS {table}")
        await cleanup(pg, unique, settings.redis_url)


def charge_app(env: dict[str, Any], schema: type[BaseModel] = Charge) -> App:
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=schema, key=lambda p: p.id)
    async def handle(p: Any, ctx: Context) -> str:
        # What the handler uses: the card, the IBAN, the exact amount.
        used = {n: getattr(p, n) for n in type(p).model_fields}
        if "card" in used:
            used["card"] = used["card"].get_secret_value()
        await ctx.db.execute(
            f"INSERT INTO {env['table']} (k, v) VALUES ($1, $2)",
            p.id,
            json.dumps(used, default=str, sort_keys=True),
        )
        return "charged"

    return app


def answers(spy: Spy, offsets: tuple[int, ...] | list[int]) -> list[list[Outcome]]:
    """Each record's outcomes, without the SKIPPED of a re-read below the stored position."""
    return [[o for o in spy.at(0, off) if o is not Outcome.SKIPPED] for off in offsets]


async def effects(env: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows = await env["pg"].fetch(f"SELECT k, v FROM {env['table']} ORDER BY k")
    return [(r["k"], json.loads(r["v"])) for r in rows]


async def test_reused_key_with_another_card_or_iban_is_a_conflict(env, producer):
    app = charge_app(env)
    first = {"id": "c1", "card": "4111111111111111", "iban": "DE89370400440532013000"}
    async with running(app) as worker:
        spy = Spy(worker)
        offs = [
            await send(producer, env["topic"], first),
            await send(producer, env["topic"], first),  # the same payload: a duplicate
            await send(producer, env["topic"], {**first, "card": "5500000000000004"}),
            await send(producer, env["topic"], {**first, "iban": "FR1420041010050500013M02606"}),
        ]
        await wait_offset(env["pg"], env["group"], env["topic"], 0, offs[-1] + 1)
    assert answers(spy, offs) == [[APPLIED], [DUPLICATE], [CONFLICT], [CONFLICT]]
    [(key, used)] = await effects(env)
    assert (key, used["card"], used["iban"]) == ("c1", first["card"], first["iban"])


async def test_json_amount_is_credited_exactly_and_another_amount_conflicts(env, producer):
    app = charge_app(env)
    exact = b'{"id": "a1", "card": "4111", "amount": 12345678901234567.89}'
    other = b'{"id": "a1", "card": "4111", "amount": 12345678901234567.68}'
    ctype = {"content-type": b"application/json"}
    async with running(app) as worker:
        spy = Spy(worker)
        o1 = await send(producer, env["topic"], value=exact, headers=ctype)
        o2 = await send(producer, env["topic"], value=other, headers=ctype)
        await wait_offset(env["pg"], env["group"], env["topic"], 0, o2 + 1)
    assert answers(spy, [o1, o2]) == [[APPLIED], [CONFLICT]]
    [(_, used)] = await effects(env)
    assert used["amount"] == "12345678901234567.89"


class Old(BaseModel):
    id: str
    cents: int


class New(BaseModel):
    id: str
    cents: int
    currency: str = "EUR"  # added in a later release, with a default


async def test_a_schema_gaining_a_defaulted_field_keeps_old_copies_duplicates(
    env, producer, settings
):
    old = {"id": "e1", "cents": 5}
    async with running(charge_app(env, Old)):
        o1 = await send(producer, env["topic"], old)
        await wait_offset(env["pg"], env["group"], env["topic"], 0, o1 + 1)
    ns = f"{env['group']}.handle"
    r = aioredis.Redis.from_url(settings.redis_url)
    try:
        async with running(charge_app(env, New)) as worker:
            spy = Spy(worker)
            # First answered by the done marker the old schema's run left in Redis ...
            o2 = await send(producer, env["topic"], old)
            await wait_offset(env["pg"], env["group"], env["topic"], 0, o2 + 1)
            # ... then, with Redis forgetting it, by the PostgreSQL record.
            await r.delete(done_key(ns, "e1", await db_epoch(env["pg"])))
            o3 = await send(producer, env["topic"], old)
            o4 = await send(producer, env["topic"], {**old, "currency": "USD"})
            await wait_offset(env["pg"], env["group"], env["topic"], 0, o4 + 1)
    finally:
        await r.aclose()
    assert answers(spy, (o2, o3, o4)) == [[DUPLICATE], [DUPLICATE], [CONFLICT]]
    assert [k for k, _ in await effects(env)] == ["e1"]


async def test_records_made_with_version_1_keep_answering_after_the_upgrade(
    env, producer, settings
):
    # Rows and markers as the previous release wrote them: a version-1 hash (model_dump, JSON
    # numbers read as floats), no hash_version (the migration's default, 1), a bare marker.
    app = charge_app(env)
    ns = f"{env['group']}.handle"
    by_pg = b'{"id": "v1-pg", "card": "4111", "amount": 12345678901234567.89}'
    by_marker = {"id": "v1-redis", "card": "4111", "amount": "2.50"}
    v1_pg = payload_hash(Charge.model_validate(json.loads(by_pg)), version=1)
    v1_marker = payload_hash(Charge.model_validate(by_marker), version=1)
    await env["pg"].execute(
        """INSERT INTO dedup.inbox (namespace, key, payload_hash, hash_alg, status, result,
               topic, partition, "offset", completed_at)
           VALUES ($1, 'v1-pg', $2, 'blake2b-128', 'done', '"old"', $3, 0, 0, now()),
                  ($1, 'v1-redis', $4, 'blake2b-128', 'done', '"old"', $3, 0, 0, now())""",
        ns,
        v1_pg,
        env["topic"],
        v1_marker,
    )
    assert {r["hash_version"] for r in (await inbox(env["pg"], ns)).values()} == {1}
    r = aioredis.Redis.from_url(settings.redis_url)
    try:
        epoch = await db_epoch(env["pg"])
        await r.set(done_key(ns, "v1-redis", epoch), f"done:{v1_marker}", ex=120)
        ctype = {"content-type": b"application/json"}
        async with running(app) as worker:
            spy = Spy(worker)
            o1 = await send(producer, env["topic"], value=by_pg, headers=ctype)
            o2 = await send(producer, env["topic"], by_marker)
            o3 = await send(
                producer, env["topic"], value=by_pg.replace(b"89", b"00"), headers=ctype
            )
            o4 = await send(producer, env["topic"], {**by_marker, "amount": "2.51"})
            await wait_offset(env["pg"], env["group"], env["topic"], 0, o4 + 1)
    finally:
        await r.aclose()
    assert answers(spy, (o1, o2, o3, o4)) == [
        [DUPLICATE],
        [DUPLICATE],
        [CONFLICT],
        [CONFLICT],
    ]
    assert await effects(env) == []  # nothing applied again


async def test_a_record_of_an_unknown_hash_version_stops_the_partition(settings, pg, unique):
    # Written by a newer release (then rolled back): neither a duplicate nor a conflict can
    # be told, so the partition stops at it with a clear error and nothing is recorded.
    async with direct_env(settings, pg, unique, "hash-vx") as env:
        app = App(env["group"], settings=env["settings"])
        calls: list[str] = []

        @app.handler(env["topic"], schema=Old, key=lambda p: p.id)
        async def handle(p: Old, ctx: Context) -> None:
            calls.append(p.id)

        ns = f"{env['group']}.handle"
        await pg.execute(
            """INSERT INTO dedup.inbox (namespace, key, payload_hash, hash_alg, hash_version,
                   status, topic, partition, "offset", completed_at)
               VALUES ($1, 'x', 'h', 'blake2b-128', 9, 'done', $2, 0, 0, now())""",
            ns,
            env["topic"],
        )
        msgs: list[Message] = [record(env["topic"], 0, {"id": "x", "cents": 1})]
        results = await drive(direct_processor(app, env), msgs, rounds=2)
        assert [r.retry_offset for r in results] == [0, 0]
        assert all("canonical-form version" in (r.error or "") for r in results)
        assert calls == []
        assert (await inbox(pg, ns))["x"]["hash_version"] == 9


# Review of the canonical form v2: payloads the handler tells apart never read alike.

JSON = {"content-type": b"application/json"}


async def test_amounts_past_28_significant_digits_are_told_apart(env, producer):
    # Decimal.normalize() rounds to the context's 28 digits: .91 and .92 read alike.
    first = b'{"id": "d1", "card": "4111", "amount": 1234567890123456789012345678.91}'
    other = b'{"id": "d1", "card": "4111", "amount": 1234567890123456789012345678.92}'
    async with running(charge_app(env)) as worker:
        spy = Spy(worker)
        o1 = await send(producer, env["topic"], value=first, headers=JSON)
        o2 = await send(producer, env["topic"], value=other, headers=JSON)
        o3 = await send(producer, env["topic"], value=first, headers=JSON)
        await wait_offset(env["pg"], env["group"], env["topic"], 0, o3 + 1)
    assert answers(spy, [o1, o2, o3]) == [[APPLIED], [CONFLICT], [DUPLICATE]]
    [(_, used)] = await effects(env)
    assert Decimal(used["amount"]) == Decimal("1234567890123456789012345678.91")


class Ledger(BaseModel):
    id: str
    units: int  # big integers: a JSON number of 30 digits, or a digit string


async def test_big_integers_past_28_digits_are_told_apart(env, producer):
    async with running(charge_app(env, Ledger)) as worker:
        spy = Spy(worker)
        o1 = await send(producer, env["topic"], {"id": "i1", "units": str(10**30)})
        o2 = await send(producer, env["topic"], {"id": "i1", "units": str(10**30 + 1)})
        await wait_offset(env["pg"], env["group"], env["topic"], 0, o2 + 1)
    assert answers(spy, [o1, o2]) == [[APPLIED], [CONFLICT]]
    [(_, used)] = await effects(env)
    assert used["units"] == 10**30


async def test_a_decimal_past_the_context_exponent_is_applied_not_dead_lettered(env, producer):
    # The schema accepts Decimal("1E+1000000"); the hash raised decimal.Overflow, and the
    # record became an "invalid" dead letter the handler never saw.
    async with running(charge_app(env)) as worker:
        spy = Spy(worker)
        o1 = await send(producer, env["topic"], {"id": "x1", "card": "4", "amount": "1e1000000"})
        await wait_offset(env["pg"], env["group"], env["topic"], 0, o1 + 1)
    assert answers(spy, [o1]) == [[APPLIED]]
    [(_, used)] = await effects(env)
    assert Decimal(used["amount"]) == Decimal("1e1000000")


class Aliased(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    amount: int = Field(alias="amt")


async def test_an_extra_field_named_like_a_field_is_not_that_field(env, producer):
    # {"amt": 5, "amount": 7}: field amount=5, extra "amount"=7. Swapped, the handler is
    # given amount=7: another payload.
    async with running(charge_app(env, Aliased)) as worker:
        spy = Spy(worker)
        o1 = await send(producer, env["topic"], {"id": "a1", "amt": 5, "amount": 7})
        o2 = await send(producer, env["topic"], {"id": "a1", "amt": 7, "amount": 5})
        await wait_offset(env["pg"], env["group"], env["topic"], 0, o2 + 1)
    assert answers(spy, [o1, o2]) == [[APPLIED], [CONFLICT]]
    [(_, used)] = await effects(env)
    assert used["amount"] == 5


class Card(BaseModel):
    number: str


class Bank(BaseModel):
    number: str
    bic: str = ""


class Payout(BaseModel):
    id: str
    method: Card | Bank  # pydantic picks the member that the payload sets most fields of


def payout_app(env: dict[str, Any]) -> App:
    app = App(env["group"], settings=env["settings"])

    @app.handler(env["topic"], schema=Payout, key=lambda p: p.id)
    async def handle(p: Payout, ctx: Context) -> str:
        how = "wire" if isinstance(p.method, Bank) else "card"
        await ctx.db.execute(
            f"INSERT INTO {env['table']} (k, v) VALUES ($1, $2)", p.id, json.dumps(how)
        )
        return how

    return app


async def test_union_members_with_the_same_values_are_told_apart(env, producer):
    async with running(payout_app(env)) as worker:
        spy = Spy(worker)
        o1 = await send(producer, env["topic"], {"id": "p1", "method": {"number": "9"}})
        o2 = await send(producer, env["topic"], {"id": "p1", "method": {"number": "9", "bic": ""}})
        await wait_offset(env["pg"], env["group"], env["topic"], 0, o2 + 1)
    assert answers(spy, [o1, o2]) == [[APPLIED], [CONFLICT]]
    assert await effects(env) == [("p1", "card")]


async def test_a_copy_version_1_cannot_hash_is_a_conflict_of_a_version_1_record(
    settings, pg, unique
):
    # Version 1 raised decimal.Overflow on Decimal("1E+1000000") (so it never recorded such a
    # payload); version 2 hashes it. Compared with a version-1 record of the same key, the
    # version-1 digest raised inside the batch transaction: the partition retried forever.
    async with direct_env(settings, pg, unique, "hash-v1x") as env:
        app = App(env["group"], settings=env["settings"])
        calls: list[str] = []

        @app.handler(env["topic"], schema=Charge, key=lambda p: p.id)
        async def handle(p: Charge, ctx: Context) -> None:
            calls.append(p.id)

        ns = f"{env['group']}.handle"
        old = payload_hash(Charge.model_validate({"id": "x", "card": "4", "amount": 5}), version=1)
        await pg.execute(
            """INSERT INTO dedup.inbox (namespace, key, payload_hash, hash_alg, status, result,
                   topic, partition, "offset", completed_at)
               VALUES ($1, 'x', $2, 'blake2b-128', 'done', '"old"', $3, 0, 0, now())""",
            ns,
            old,
            env["topic"],
        )
        msgs = [record(env["topic"], 0, {"id": "x", "card": "4", "amount": "1e1000000"})]
        results = await drive(direct_processor(app, env), msgs, rounds=2)
        assert [r.retry_offset for r in results] == [None]
        assert [h.outcome for h in results[0].handled] == [CONFLICT]
        assert calls == []
