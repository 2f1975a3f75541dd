"""``@app.handler`` refuses bad options at import time, saying how to fix them."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from consumer import App, ConfigError, Context, Handler

pytestmark = pytest.mark.unit


class Pay(BaseModel):
    id: str
    sent_at: str = ""


async def fn(p: Pay, ctx: Context) -> None:
    return None


def test_returns_a_handler_object_with_its_identity_rules():
    app = App("g")
    h = app.handler("t1", "t2", schema=Pay, key=lambda p: p.id, hash_exclude={"sent_at"})(fn)
    assert isinstance(h, Handler)
    assert h.name == "g.fn"
    assert h.topics == ("t1", "t2")
    assert h.key_from == "payload"
    assert h.hash_exclude == frozenset({"sent_at"})
    assert h.is_async
    assert app.handler_for("t2") is h
    assert app.topics == ["t1", "t2"]
    assert app.handler("t3", schema=Pay, name="h")(fn).key_from == "header"
    assert app.handler("t4", schema=Pay, key="record", name="r")(fn).key_from == "record"


def test_sync_functions_are_accepted_and_run_in_a_thread():
    def sync(p: Pay, ctx: Context) -> None:
        return None

    assert App("g").handler("t", schema=Pay)(sync).is_async is False


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"key": 123}, "key="),
        ({"key": "payload"}, "key="),
        ({"hash_exclude": {"sent_on"}}, "sent_on"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"on_error": "explode"}, "on_error"),
        ({"name": "a}b"}, "'}'"),
        ({"name": " "}, "must not be empty"),
        # name@tenant is the namespace: a name with '@' would share a tenant's key space.
        ({"name": "X@v2"}, "'@'"),
        ({"name": "orders:v2"}, "':'"),
        ({"name": "reply"}, "reserved"),
        ({"name": "a\x00b"}, "control characters"),
        ({"name": "n" * 201}, "at most 200 bytes"),
    ],
)
def test_bad_options_are_refused(kwargs, needle):
    with pytest.raises(ConfigError) as exc:
        App("g").handler("t", schema=Pay, **kwargs)(fn)
    assert needle in str(exc.value)


def test_schema_must_be_a_model():
    with pytest.raises(ConfigError, match="schema="):
        App("g").handler("t", schema=dict)(fn)  # type: ignore[type-var]


def test_no_topics():
    with pytest.raises(ConfigError, match="topic"):
        App("g").handler(schema=Pay)(fn)


def test_function_must_take_payload_and_ctx():
    async def one(p: Pay) -> None:
        return None

    with pytest.raises(ConfigError, match="payload, ctx"):
        App("g").handler("t", schema=Pay)(one)  # type: ignore[arg-type]


def test_two_handlers_for_one_topic():
    app = App("g")
    app.handler("t", schema=Pay)(fn)

    async def other(p: Pay, ctx: Context) -> None:
        return None

    with pytest.raises(ConfigError, match="one handler per topic"):
        app.handler("t", schema=Pay)(other)
    # The refused handler left no trace.
    assert [h.name for h in app.handlers] == ["g.fn"]


def test_two_handlers_with_one_name():
    app = App("g")
    app.handler("t1", schema=Pay)(fn)
    with pytest.raises(ConfigError, match="name="):
        app.handler("t2", schema=Pay)(fn)
    assert app.handler("t2", schema=Pay, name="g.fn2")(fn).name == "g.fn2"


@pytest.mark.parametrize("group", ["", "has space", "semi;colon", "br{ace}"])
def test_bad_group_names(group):
    with pytest.raises(ConfigError):
        App(group)
