"""Settings: read once from CONSUMER_* variables; a bad, unknown or missing one is named."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from consumer import App, ConfigError, Outcome, Settings, load_settings
from consumer.settings import DOCUMENTED_EXTRA, known_variables
from consumer.testing import TestApp

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CONNECTIONS = {
    "CONSUMER_KAFKA_BOOTSTRAP": "127.0.0.1:1",
    "CONSUMER_REDIS_URL": "redis://127.0.0.1:1/0",
    "CONSUMER_POSTGRES_DSN": "postgresql://nobody@127.0.0.1:1/none",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # The developer's .env (loaded by conftest) must not decide these tests.
    for name in list(os.environ):
        if name.upper().startswith("CONSUMER_"):
            monkeypatch.delenv(name)


@pytest.fixture
def connections(monkeypatch):
    for name, value in CONNECTIONS.items():
        monkeypatch.setenv(name, value)


def test_defaults_load(connections):
    s = load_settings()
    assert isinstance(s, Settings)
    assert s.max_attempts >= 1 and s.lease_ms >= 100


def test_no_connection_setting_has_a_default():
    # f68ba1f defaulted to the dev ports: `consumer migrate` wrote to whatever listened there.
    with pytest.raises(ConfigError) as exc:
        load_settings()
    message = str(exc.value)
    assert "\n" not in message
    for name in CONNECTIONS:
        assert name in message


@pytest.mark.parametrize("name", sorted(CONNECTIONS))
def test_each_missing_connection_setting_is_named(monkeypatch, connections, name):
    monkeypatch.delenv(name)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert name in str(exc.value)
    assert [n for n in CONNECTIONS if n in str(exc.value)] == [name]


def test_redis_url_is_not_needed_with_redis_off(monkeypatch, connections):
    monkeypatch.delenv("CONSUMER_REDIS_URL")
    monkeypatch.setenv("CONSUMER_REDIS_MODE", "off")
    assert load_settings().redis_url == ""


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("CONSUMER_LEASE_MSS", "CONSUMER_LEASE_MS"),
        ("CONSUMER_POSTGRES_URL", "CONSUMER_POSTGRES_DSN"),
        ("consumer_max_atempts", "CONSUMER_MAX_ATTEMPTS"),
        ("CONSUMER_NOTHING_LIKE_IT", None),
    ],
)
def test_an_unknown_variable_is_named_with_a_suggestion(
    monkeypatch, connections, variable, suggestion
):
    monkeypatch.setenv(variable, "5")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    message = str(exc.value)
    assert f"unknown setting {variable}" in message
    if suggestion:
        assert f"did you mean {suggestion}?" in message
    else:
        assert "did you mean" not in message


def test_settings_built_in_code_refuse_unknown_variables_and_keywords(monkeypatch):
    monkeypatch.setenv("CONSUMER_LEASE_MSS", "5")
    with pytest.raises(ConfigError, match="CONSUMER_LEASE_MSS"):
        Settings()
    monkeypatch.delenv("CONSUMER_LEASE_MSS")
    with pytest.raises(ConfigError, match="lease_mss: not a setting"):
        load_settings(require_connections=False, lease_mss=5)


def test_every_consumer_variable_the_tree_reads_is_a_setting():
    # Scripts, tests, docs and the supervisor pass CONSUMER_* variables around: each one
    # must be a field (or documented), or the unknown-variable check would refuse it.
    pattern = re.compile(r"\bCONSUMER_[A-Z][A-Z0-9_]*[A-Z0-9]\b")
    found: dict[str, str] = {}
    for folder in ("consumer", "handlers", "scripts", "tests", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".md", ".sh", ".toml"} and path.is_file():
                for name in pattern.findall(path.read_text(errors="replace")):
                    found.setdefault(name, str(path.relative_to(ROOT)))
    for path in (ROOT / "Makefile", ROOT / "README.md"):
        for name in pattern.findall(path.read_text()):
            found.setdefault(name, path.name)
    # Names written in these tests as deliberate typos, and pattern-only fragments.
    typos = {"CONSUMER_LEASE_MSS", "CONSUMER_POSTGRES_URL", "CONSUMER_NOTHING_LIKE_IT"}
    unknown = {n: where for n, where in found.items() if n not in known_variables()}
    assert {n: w for n, w in unknown.items() if n not in typos} == {}
    assert DOCUMENTED_EXTRA <= known_variables()


class _P(BaseModel):
    n: int


async def test_the_test_harness_needs_no_connection_settings():
    app = App("harness-no-env")

    @app.handler("t", schema=_P, key="header")
    async def h(p: _P, ctx) -> int:
        return p.n

    async with TestApp(app) as t:
        result = await t.send("t", {"n": 3}, headers={"idempotency-key": "k1"})
    assert result.outcome is Outcome.APPLIED and result.result == 3


def test_environment_is_read_with_the_prefix(monkeypatch, connections):
    monkeypatch.setenv("CONSUMER_LEASE_MS", "4500")
    monkeypatch.setenv("CONSUMER_REDIS_MODE", "off")
    s = load_settings()
    assert s.lease_ms == 4500
    assert s.redis_mode == "off"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CONSUMER_LEASE_MS", "soon"),
        ("CONSUMER_LEASE_MS", "10"),
        ("CONSUMER_BATCH_MAX_RECORDS", "0"),
        ("CONSUMER_MAX_ATTEMPTS", "0"),
        ("CONSUMER_REDIS_MODE", "maybe"),
        ("CONSUMER_HANDLER_TIMEOUT_S", "-1"),
        ("CONSUMER_METRICS_PORT", "70000"),
    ],
)
def test_bad_value_names_the_variable(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert variable in str(exc.value)
    assert value in str(exc.value)


def test_bad_override_names_the_variable():
    with pytest.raises(ConfigError) as exc:
        load_settings(retry_backoff_ms=-5)
    assert "CONSUMER_RETRY_BACKOFF_MS" in str(exc.value)


def test_every_bad_value_is_reported_at_once(monkeypatch):
    monkeypatch.setenv("CONSUMER_LEASE_MS", "x")
    monkeypatch.setenv("CONSUMER_MAX_ATTEMPTS", "y")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "CONSUMER_LEASE_MS" in str(exc.value)
    assert "CONSUMER_MAX_ATTEMPTS" in str(exc.value)


def test_settings_are_frozen(connections):
    s = load_settings()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError
        s.lease_ms = 1  # type: ignore[misc]


def test_a_copy_with_a_misspelt_field_is_refused(connections):
    # pydantic's model_copy adds unknown keys silently: every test's app_settings(...) and the
    # worker's own copies go through it.
    s = load_settings()
    assert s.model_copy(update={"lease_ms": 500}).lease_ms == 500
    with pytest.raises(ConfigError, match="lease_mss"):
        s.model_copy(update={"lease_mss": 500})
