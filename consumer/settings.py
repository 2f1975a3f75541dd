"""Typed settings, read once from the environment (prefix ``CONSUMER_``) and validated at start.

No other module reads the environment for these values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from consumer.errors import ConfigError

# Durations PostgreSQL intervals and timestamps can still hold when subtracted from now().
_TEN_YEARS_S = 10 * 365 * 24 * 3600


class Settings(BaseSettings):
    """Everything a worker needs to know about its environment. Units are in the names."""

    model_config = SettingsConfigDict(env_prefix="CONSUMER_", extra="ignore", frozen=True)

    kafka_bootstrap: str = "127.0.0.1:19092"
    redis_url: str = "redis://127.0.0.1:16379/0"
    postgres_dsn: str = "postgresql://postgres@127.0.0.1:15432/consumer"

    batch_max_records: int = Field(default=500, ge=1, le=10_000)
    fetch_timeout_ms: int = Field(default=200, ge=1)
    # Renewed every lease_ms/3 while a batch runs, so it need not cover the handler timeout;
    # it bounds how long a key waits after its holder dies before committing.
    lease_ms: int = Field(default=10_000, ge=100)
    lease_wait_ms: int = Field(default=5_000, ge=0)
    dedup_window_s: int = Field(default=7 * 24 * 3600, ge=60, le=_TEN_YEARS_S)
    done_cache_s: int = Field(default=24 * 3600, ge=1)
    handler_timeout_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    # What transient failures past max_attempts become. "failed" (default): a dead letter and
    # no record, so the key is not burned and `consumer replay` re-drives it. "rejected": also
    # recorded as rejected (DESIGN.md's original rule), so every later copy gets that answer.
    exhausted_outcome: Literal["failed", "rejected"] = "failed"
    retry_backoff_ms: int = Field(default=200, ge=0)
    retry_backoff_max_ms: int = Field(default=10_000, ge=0)
    redis_retry_s: float = Field(default=5.0, gt=0)
    pg_pool_max: int = Field(default=8, ge=1)
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    static_membership: bool = False
    # read_committed: records of aborted (and still open) upstream Kafka transactions are
    # never handed to a handler. read_uncommitted hands them over: only for topics written
    # without transactions, where the two are the same.
    kafka_isolation_level: Literal["read_committed", "read_uncommitted"] = "read_committed"
    relay_enabled: bool = True
    relay_batch: int = Field(default=500, ge=1)
    relay_poll_ms: int = Field(default=1_000, ge=10)
    # Longest wait for the broker's ack (and for a topic's metadata) while a relay tick holds
    # its transaction open; unacked rows stay pending and are sent again.
    relay_publish_timeout_ms: int = Field(default=30_000, ge=100)
    outbox_retention_s: int = Field(default=24 * 3600, ge=0, le=_TEN_YEARS_S)
    cleanup_interval_s: float = Field(default=60.0, gt=0)
    cleanup_batch: int = Field(default=1_000, ge=1)
    hash_keys_in_logs: bool = False
    log_json: bool = False
    status_interval_s: float = Field(default=5.0, gt=0)
    # Supervisor (consumer run): below the orchestrator's own kill timeout (Kubernetes: 30 s).
    shutdown_grace_s: float = Field(default=25.0, gt=0)
    restart_backoff_s: float = Field(default=0.5, ge=0)
    restart_backoff_max_s: float = Field(default=30.0, ge=0)
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_dir: str = ""
    tenant_header: str = "tenant"
    redis_mode: Literal["on", "off"] = "on"
    # CONSUMER_REDIS_URL names one node of a Redis Cluster; calls are split per namespace
    # (one hash slot each), see consumer/dedup/cluster.py.
    redis_cluster: bool = False
    faults: str = ""  # test-only: see consumer/faults.py
    # TEST-ONLY deliberately broken build, so the chaos checker (scripts/chaos) can show it
    # bites: "done_before_commit" writes the Redis done markers before the database commit,
    # so a crash at the before_commit fault point loses the batch. Never set it otherwise.
    unsafe_broken: Literal["", "done_before_commit"] = ""


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; a bad value raises ConfigError naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            lines.append(f"CONSUMER_{field.upper()}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None
