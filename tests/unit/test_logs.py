"""Log lines: JSON fields, readable lines, per-message outcome lines and hashed keys."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from consumer import logs
from consumer.message import Message
from consumer.runtime.outcomes import BatchResult, Handled, Outcome

pytestmark = pytest.mark.unit

MSG = Message("pay", 2, 41, b"k", b"v")


def record(msg: str = "hello %s", args: tuple[object, ...] = ("world",), **extra: object):
    rec = logging.LogRecord("consumer.worker", logging.WARNING, __file__, 1, msg, args, None)
    for name, value in extra.items():
        setattr(rec, name, value)
    return rec


def test_a_hashed_key_is_blake2b_128_of_the_key_and_a_clear_one_is_itself():
    digest = hashlib.blake2b(b"card-4111", digest_size=16).hexdigest()
    assert logs.key_for_logs("card-4111", hashed=True) == "b2:" + digest
    assert logs.key_for_logs("card-4111", hashed=False) == "card-4111"
    assert logs.key_for_logs("", hashed=True) == ""  # no key (an invalid message): nothing


def test_a_lone_surrogate_key_still_hashes():
    assert logs.key_for_logs("\udcff", hashed=True).startswith("b2:")


def test_json_lines_carry_the_fixed_fields_first_then_the_extra_ones():
    line = logs.JsonFormatter().format(record(worker=3, slot=" w3", key="b2:00", partition=1))
    data = json.loads(line)
    assert list(data)[:6] == ["ts", "level", "logger", "msg", "pid", "worker"]
    assert data["msg"] == "hello world" and data["level"] == "warning" and data["worker"] == 3
    assert data["key"] == "b2:00" and data["partition"] == 1
    assert "slot" not in data and "message" not in data


def test_json_lines_put_the_traceback_in_exc():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = record("failed", ())
        rec.exc_info = sys.exc_info()
    data = json.loads(logs.JsonFormatter().format(rec))
    assert data["msg"] == "failed" and "ValueError: boom" in data["exc"]


def test_plain_lines_read_like_the_classic_format_with_fields_after():
    line = logs.PlainFormatter().format(record(slot=" w1", worker=1, key="b2:00", status={}))
    head, _, rest = line.partition(" WARNING ")
    assert head.endswith("Z")  # an ISO timestamp in UTC
    assert rest.endswith("] consumer.worker: hello world key=b2:00")
    assert " w1]" in rest and "status" not in rest


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_readable_lines_on_a_terminal_json_only_when_asked():
    assert isinstance(logs.formatter(False, _Tty()), logs.ConsoleFormatter)
    assert isinstance(logs.formatter(False, io.StringIO()), logs.PlainFormatter)
    assert isinstance(logs.formatter(True, _Tty()), logs.JsonFormatter)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        structlog.reset_defaults()


def test_setup_renders_structlog_and_stdlib_calls_alike(restored_logging, capsys):
    logs.setup(json_lines=True, worker=2)
    logging.getLogger("consumer.worker").info("from logging", extra={"topic": "t"})
    structlog.get_logger("app.handlers").info("from structlog", amount=3)
    structlog.get_logger("app.handlers").debug("below the level")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(x["logger"], x["msg"], x["worker"]) for x in lines] == [
        ("consumer.worker", "from logging", 2),
        ("app.handlers", "from structlog", 2),
    ]
    assert lines[0]["topic"] == "t" and lines[1]["amount"] == 3


def _result(*handled: Handled) -> BatchResult:
    return BatchResult(handled=list(handled))


def test_outcome_lines_name_the_message_and_hide_the_key(caplog):
    caplog.set_level(logging.DEBUG, logger="consumer.outcomes")
    result = _result(
        Handled(MSG, Outcome.APPLIED, "g.settle", "card-4111", "h1"),
        Handled(MSG, Outcome.CONFLICT, "g.settle", "card-4111", "h2", "stored hash h1"),
        Handled(MSG, Outcome.INVALID, reason="undecodable"),
    )
    logs.log_outcomes([result], hash_keys=True)
    got = [(r.levelno, r.outcome, r.key, r.reason) for r in caplog.records]
    hashed = logs.key_for_logs("card-4111", True)
    assert got == [
        (logging.DEBUG, "applied", hashed, ""),
        (logging.WARNING, "conflict", hashed, "stored hash h1"),
        (logging.WARNING, "invalid", "", "undecodable"),
    ]
    r = caplog.records[1]
    assert (r.namespace, r.topic, r.partition, r.offset) == ("g.settle", "pay", 2, 41)
    assert r.getMessage() == "conflict pay/2/41"
    assert "card-4111" not in "".join(logs.JsonFormatter().format(x) for x in caplog.records)


def test_routine_outcomes_cost_nothing_above_debug(caplog):
    caplog.set_level(logging.INFO, logger="consumer.outcomes")
    logs.log_outcomes(
        [_result(Handled(MSG, Outcome.APPLIED), Handled(MSG, Outcome.REJECTED, reason="no"))],
        hash_keys=False,
    )
    assert [r.outcome for r in caplog.records] == ["rejected"]
