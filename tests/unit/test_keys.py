"""consumer/keys.py: derived keys are unambiguous, and names that would break that are refused."""

from __future__ import annotations

import itertools

import pytest
from pydantic import BaseModel

from consumer import App, ConfigError, Context, Settings, keys
from consumer.constants import done_key, lease_key
from consumer.testing import TestApp

pytestmark = pytest.mark.unit

TRICKY = ["", "a", ":", "%", "%3A", "a:b", "a%3Ab", "b:c", "::", "%25", "x}{y", "{a}", "a@b"]


def test_join_is_injective_and_split_inverts_it():
    seen: dict[str, tuple[str, ...]] = {}
    for parts in itertools.product(TRICKY, repeat=3):
        derived = keys.join(*parts)
        assert seen.setdefault(derived, parts) == parts, f"{parts} and {seen[derived]} collide"
        assert tuple(keys.split(derived)) == parts
    assert keys.join("plain", "p-1", "0") == "plain:p-1:0"  # plain names read as before


def test_redis_keys_of_distinct_identities_never_collide():
    namespaces = ["g.h", "g.h@org", "g.h@org:7", "g.h@a%3Ab"]
    for kind in (lease_key, lambda ns, k: done_key(ns, k, "e:1")):
        names = {kind(ns, k): (ns, k) for ns in namespaces for k in TRICKY[1:]}
        assert len(names) == len(namespaces) * (len(TRICKY) - 1)


class Pay(BaseModel):
    id: str


def test_a_default_name_is_checked_too():
    async def fn(p: Pay, ctx: Context) -> None: ...

    fn.__name__ = "v2@x"
    with pytest.raises(ConfigError, match="'@'"):
        App("g").handler("t", schema=Pay)(fn)


async def test_harness_gives_handlers_the_same_outside_key():
    app = App("shop", settings=Settings())
    seen: list[str] = []

    @app.handler("orders", schema=Pay, key=lambda p: p.id)
    async def reserve(p: Pay, ctx: Context) -> None:
        seen.append(ctx.outside_key)

    async with TestApp(app) as t:
        await t.send("orders", Pay(id="7:inv-3"), headers={"tenant": "org"})
        await t.send("orders", Pay(id="inv-3"), headers={"tenant": "org:7"})
    assert seen == ["shop.reserve@org:7%3Ainv-3", "shop.reserve@org%3A7:inv-3"]
