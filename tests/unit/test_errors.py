"""Error classification: which failures are indefinite (retried, nothing recorded)."""

from __future__ import annotations

import aiokafka.errors
import asyncpg
import pytest
import redis.exceptions
import requests.exceptions
import urllib3.exceptions

import consumer
from consumer import errors
from consumer.db.guard import UnsafeStatement
from consumer.errors import is_retriable
from consumer.outbox.writer import OutboxError

pytestmark = pytest.mark.unit


class _SqlState(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


class Flaky(Exception):
    pass


def _lib(module: str, *names: str) -> type[Exception]:
    """A stand-in for a client library's exception hierarchy (httpx and aiohttp are not
    dependencies): the named classes, each a subclass of the next, defined in ``module``."""
    base: type[Exception] = Exception
    for name in reversed(names):
        base = type(name, (base,), {"__module__": module})
    return base


# The rule of docs/handlers.md#classification, row by row: (what, exception, expected).
# True: indefinite (retried, nothing recorded); False: definite; None: ``on_error`` decides.
RULE = [
    ("statement_timeout", _SqlState("57014"), True),
    ("admin shutdown", _SqlState("57P01"), True),
    ("crash shutdown", _SqlState("57P02"), True),
    ("cannot connect now", _SqlState("57P03"), True),
    ("database dropped", _SqlState("57P04"), True),
    ("idle session timeout", _SqlState("57P05"), True),
    ("disk full", _SqlState("53100"), True),
    ("out of memory", _SqlState("53200"), True),
    ("too many connections", _SqlState("53300"), True),
    ("connection failure", _SqlState("08006"), True),
    ("serialization failure", _SqlState("40001"), True),
    ("deadlock", _SqlState("40P01"), True),
    ("statement completion unknown", _SqlState("40003"), True),
    ("lock_timeout / NOWAIT", _SqlState("55P03"), True),
    ("idle in transaction timeout", _SqlState("25P03"), True),
    ("transaction timeout", _SqlState("25P04"), True),
    ("I/O error", _SqlState("58030"), True),
    ("internal error", _SqlState("XX000"), True),
    ("data corrupted", _SqlState("XX001"), True),
    ("real statement_timeout", asyncpg.exceptions.QueryCanceledError("x"), True),
    ("real lock_timeout", asyncpg.exceptions.LockNotAvailableError("x"), True),
    ("real disk full", asyncpg.exceptions.DiskFullError("x"), True),
    ("real idle timeout", asyncpg.exceptions.IdleInTransactionSessionTimeoutError("x"), True),
    ("TimeoutError", TimeoutError(), True),
    ("ConnectionError", ConnectionResetError(), True),
    ("OSError", OSError("network unreachable"), True),
    ("redis-py timeout", redis.exceptions.TimeoutError("x"), True),
    ("redis-py connection", redis.exceptions.ConnectionError("x"), True),
    ("redis-py loading", redis.exceptions.BusyLoadingError("x"), True),
    ("redis-py cluster down", redis.exceptions.ClusterDownError("x"), True),
    ("redis-py try again", redis.exceptions.TryAgainError("x"), True),
    ("requests timeout", requests.exceptions.ReadTimeout("x"), True),
    ("requests connection", requests.exceptions.ConnectionError("x"), True),
    ("urllib3 read timeout", urllib3.exceptions.ReadTimeoutError(None, "u", "x"), True),
    ("urllib3 protocol", urllib3.exceptions.ProtocolError("x"), True),
    (
        "httpx ReadTimeout",
        _lib("httpx", "ReadTimeout", "TimeoutException", "TransportError", "HTTPError")(),
        True,
    ),
    ("httpx ConnectError", _lib("httpx", "ConnectError", "NetworkError", "TransportError")(), True),
    ("httpx RemoteProtocolError", _lib("httpx", "RemoteProtocolError", "ProtocolError")(), True),
    (
        "aiohttp ServerDisconnectedError",
        _lib(
            "aiohttp",
            "ServerDisconnectedError",
            "ServerConnectionError",
            "ClientConnectionError",
            "ClientError",
        )(),
        True,
    ),
    (
        "aiohttp ClientConnectionError",
        _lib("aiohttp", "ClientConnectionError", "ClientError")(),
        True,
    ),
    ("botocore ConnectTimeout", _lib("botocore", "ConnectTimeout")(), True),
    ("aiokafka timeout", aiokafka.errors.KafkaTimeoutError(), True),
    ("aiokafka connection", aiokafka.errors.KafkaConnectionError(), True),
    ("aiokafka request timed out", aiokafka.errors.RequestTimedOutError(), True),
    ("aiokafka not leader", aiokafka.errors.NotLeaderForPartitionError(), True),
    ("aiokafka node not ready", aiokafka.errors.NodeNotReadyError(), True),
    ("aiokafka authorization", aiokafka.errors.TopicAuthorizationFailedError(), None),
    ("task group with a timeout", ExceptionGroup("g", [ValueError(), TimeoutError()]), True),
    (
        "task group of definite",
        ExceptionGroup("g", [errors.Reject("a"), errors.Reject("b")]),
        False,
    ),
    ("task group of unknown", ExceptionGroup("g", [ValueError(), errors.Reject("b")]), None),
    ("Reject", errors.Reject("no"), False),
    ("unique violation", asyncpg.exceptions.UniqueViolationError("x"), None),
    ("check violation", _SqlState("23514"), None),
    ("invalid text", _SqlState("22P02"), None),
    ("undefined table", _SqlState("42P01"), None),
    ("plpgsql RAISE", _SqlState("P0001"), None),
    ("invalid transaction state", _SqlState("25001"), None),
    ("asyncpg client-side DataError", asyncpg.exceptions._base.DataError("x"), None),
    ("ctx.db refusal", UnsafeStatement("x"), None),
    ("redis-py ResponseError", redis.exceptions.ResponseError("x"), None),
    ("httpx HTTPStatusError", _lib("httpx", "HTTPStatusError", "HTTPError")(), None),
    ("ValueError", ValueError("x"), None),
]


@pytest.mark.parametrize(("what", "exc", "expected"), RULE, ids=[r[0] for r in RULE])
def test_the_classification_rule(what, exc, expected):
    assert is_retriable(exc) is expected, what


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
        # Raised inside a handler, the app's bug (a model the Avro codec cannot map at
        # ctx.publish, an Outbox misused): a fixed app must still apply the key.
        errors.ConfigError("x"),
        OutboxError("x"),
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
