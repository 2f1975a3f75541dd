"""``consumer`` exports exactly its public API; everything else is internal."""

from __future__ import annotations

import inspect

import pytest

import consumer

pytestmark = pytest.mark.unit

EXPECTED = {
    "App",
    "BadKey",
    "BatchContext",
    "BatchHandler",
    "CallNext",
    "Codec",  # what app.codec() takes (docs/codecs.md)
    "ConfigError",
    "ConsumerError",
    "Context",
    "Database",
    "DecodeError",
    "Handler",
    "HandlerSignal",
    "InvalidMessage",
    "Item",
    "LeaseBusy",
    "LifespanError",
    "Message",
    "Middleware",
    "MiddlewareMisuse",
    "MigrationMismatch",
    "MissingKey",
    "Outbox",
    "OutboxError",
    "Outcome",
    "Reject",
    "Reply",
    "RequestTimeout",
    "Requester",
    "Retry",
    "SchemaError",
    "Settings",
    "ShutdownFailed",
    "StartupFailed",
    "StoreUnavailable",
    "TransientError",
    "load_settings",
    "request",
}


def test_all_is_the_public_api():
    # ==, not >= (httpx's export test): adding a name to the public face is a decision.
    assert set(consumer.__all__) == EXPECTED, set(consumer.__all__) ^ EXPECTED
    assert len(consumer.__all__) == len(set(consumer.__all__))
    assert consumer.__all__ == sorted(consumer.__all__)


def test_every_export_exists_and_is_documented():
    for name in consumer.__all__:
        obj = getattr(consumer, name)
        assert inspect.getdoc(obj), f"consumer.{name} has no docstring"


def test_nothing_public_is_left_out_of_all():
    public = {
        n for n, v in vars(consumer).items() if not n.startswith("_") and not inspect.ismodule(v)
    }
    assert public <= set(consumer.__all__), public - set(consumer.__all__)
