"""Error classification: which failures are indefinite (retried, nothing recorded)."""

from __future__ import annotations

import asyncpg
import pytest

import consumer
from consumer import errors
from consumer.errors import is_retriable

pytestmark = pytest.mark.unit


class _SqlState(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


class Flaky(Exception):
    pass


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError(),
        TimeoutError(),
        ConnectionError(),
        ConnectionResetError(),
        OSError("network unreachable"),
        _SqlState("40001"),  # serialization_failure
        _SqlState("40P01"),  # deadlock_detected
        _SqlState("55P03"),  # lock_not_available
        _SqlState("57P01"),  # admin_shutdown
        _SqlState("08006"),  # connection_failure (whole class 08)
        asyncpg.exceptions.SerializationError("x"),
        asyncpg.exceptions.DeadlockDetectedError("x"),
        asyncpg.exceptions.ConnectionDoesNotExistError("x"),
        errors.TransientError("x"),
        errors.StoreUnavailable("x"),
        errors.LeaseBusy("x"),
        errors.Retry(1.0),
    ],
)
def test_indefinite(exc):
    assert is_retriable(exc) is True


@pytest.mark.parametrize(
    "exc",
    [
        errors.Reject("no"),
        errors.DecodeError("x"),
        errors.SchemaError("x"),
        errors.MissingKey("x"),
        errors.BadKey("x"),
        errors.ConfigError("x"),
    ],
)
def test_definite(exc):
    assert is_retriable(exc) is False


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("x"),
        KeyError("x"),
        ZeroDivisionError(),
        _SqlState("23505"),  # unique_violation: a bug or a business rule, not a glitch
        asyncpg.exceptions.UniqueViolationError("x"),
        asyncpg.exceptions.UndefinedTableError("x"),
    ],
)
def test_unknown_is_left_to_the_handler_policy(exc):
    assert is_retriable(exc) is None


def test_retry_on_adds_classes():
    assert is_retriable(Flaky()) is None
    assert is_retriable(Flaky(), (Flaky,)) is True
    assert is_retriable(ValueError(), (Flaky,)) is None
    # retry_on never turns a definite signal into an indefinite one.
    assert is_retriable(errors.Reject("no"), (errors.Reject,)) is False


def test_tree_has_one_root_and_reasons():
    for name in ("ConfigError", "InvalidMessage", "TransientError", "HandlerSignal"):
        assert issubclass(getattr(errors, name), consumer.ConsumerError)
    assert {c.reason for c in (errors.DecodeError, errors.SchemaError)} == {
        "undecodable",
        "invalid_schema",
    }
    assert errors.MissingKey.reason == "missing_key"
    assert errors.BadKey.reason == "bad_key"
    r = errors.Retry(2.5, "later")
    assert (r.delay_s, r.reason) == (2.5, "later")
    assert errors.Reject("why").reason == "why"
