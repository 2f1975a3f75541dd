"""Settings: read once from CONSUMER_* variables; a bad value names the variable to fix."""

from __future__ import annotations

import pytest

from consumer import ConfigError, Settings, load_settings

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # The developer's .env (loaded by conftest) must not decide these tests.
    import os

    for name in list(os.environ):
        if name.startswith("CONSUMER_"):
            monkeypatch.delenv(name)


def test_defaults_load():
    s = load_settings()
    assert isinstance(s, Settings)
    assert s.max_attempts >= 1 and s.lease_ms >= 100


def test_environment_is_read_with_the_prefix(monkeypatch):
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


def test_settings_are_frozen():
    s = load_settings()
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError
        s.lease_ms = 1  # type: ignore[misc]
