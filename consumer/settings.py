"""Typed settings, read once from the environment (prefix ``CONSUMER_``) and validated at start.

No other module reads the environment for these values. Nothing falls back silently:

* the connection settings (``CONSUMER_KAFKA_BOOTSTRAP``, ``CONSUMER_REDIS_URL`` unless
  ``CONSUMER_REDIS_MODE=off``, ``CONSUMER_POSTGRES_DSN``) have no default; a missing one is
  an error that names it (a default once made ``consumer migrate`` write to whatever
  PostgreSQL listened on the dev port);
* a ``CONSUMER_*`` variable that is not a field here is an error that names it, with the
  closest field as a suggestion (``CONSUMER_LEASE_MSS`` used to pass unnoticed);
* an unknown keyword given to ``Settings(...)`` / ``load_settings(...)`` is refused too.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from consumer.connection_strings import check_postgres_dsn, check_redis_url
from consumer.constants import REPLY_OWN_HEADERS
from consumer.errors import ConfigError

PREFIX = "CONSUMER_"
# CONSUMER_* variables that are read but are not fields: none today. Anything else with the
# prefix is a typo or a setting of another version, and is refused (see unknown_variables).
DOCUMENTED_EXTRA: frozenset[str] = frozenset()

# Durations PostgreSQL intervals and timestamps can still hold when subtracted from now().
_TEN_YEARS_S = 10 * 365 * 24 * 3600


class Settings(BaseSettings):
    """Everything a worker needs to know about its environment. Units are in the names."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="forbid", frozen=True)

    # No defaults: "" is "not set", refused by load_settings() and before any connection.
    kafka_bootstrap: str = ""
    redis_url: str = ""
    postgres_dsn: str = ""

    batch_max_records: int = Field(default=500, ge=1, le=10_000)
    # Opt-in: handlers run without a savepoint each until one fails; then the batch is rolled
    # back and run again with savepoints (docs/handlers.md, "Optimistic execution").
    optimistic: bool = False
    # After a fallback, the partition keeps savepoints for this many batches.
    optimistic_cooldown_batches: int = Field(default=20, ge=0)
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
    # recorded as rejected (the first design note's rule, docs/design.md), so every later
    # copy gets that answer.
    exhausted_outcome: Literal["failed", "rejected"] = "failed"
    retry_backoff_ms: int = Field(default=200, ge=0)
    retry_backoff_max_ms: int = Field(default=10_000, ge=0)
    # Handlers with retry="topics" (consumer/runtime/retry_topics.py): the delay before the
    # n-th retry through <topic>.retry is base * multiplier**(n-1), capped (Spring Kafka's
    # @BackOff(delay, multiplier, maxDelay)); a Retry(delay_s) longer than that wins.
    retry_topic_backoff_ms: int = Field(default=1_000, ge=0)
    retry_topic_backoff_multiplier: float = Field(default=2.0, ge=1.0, le=100.0)
    retry_topic_backoff_max_ms: int = Field(default=60_000, ge=0, le=86_400_000)
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
    # A reply whose reply-to topic is still missing this long after it was written is given
    # up (docs/outbox.md): the requester chose the topic, and its reply would otherwise wait
    # forever. Events and dead letters to a missing topic are never given up.
    reply_topic_missing_s: int = Field(default=600, ge=0, le=_TEN_YEARS_S)
    # Request headers copied onto its reply, name and value as the request had them, so the
    # requester can match the reply: our correlation-id and FastStream's correlation_id
    # (docs/handlers.md, "Replies"). A JSON list in the environment.
    reply_copy_headers: tuple[str, ...] = ("correlation-id", "correlation_id")
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

    # ---- Kafka security, owned topics, codec default, log level (issue 16) ----
    # One place builds the clients' options from these: consumer/kafka_config.py.
    # Passwords are SecretStr: their repr and str are "**********", so no log shows them.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    # PEM files. No CA file: the system's trusted CAs (the managed clouds' public ones).
    kafka_ssl_ca_file: str = ""
    kafka_ssl_cert_file: str = ""  # client certificate (mutual TLS), with its key file
    kafka_ssl_key_file: str = ""
    kafka_ssl_key_password: SecretStr = SecretStr("")
    # Off only for a broker reached by an address its certificate does not name.
    kafka_ssl_check_hostname: bool = True
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] = (
        "PLAIN"
    )
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    # OAUTHBEARER: "module:attribute", an aiokafka AbstractTokenProvider instance or a
    # zero-argument callable returning one (the token callback).
    kafka_sasl_oauth_token_provider: str = ""
    # Bound on the metadata/admin requests made at start (topic check, topic creation).
    kafka_request_timeout_ms: int = Field(default=30_000, ge=1_000)
    # At worker start: create the framework's own topics (<source>.dlq, <source>.conflicts)
    # when missing, with the source's partition count. Source topics are never created.
    topics_create: bool = True
    # Replication factor of topics the framework creates; 0: the same as their source's.
    topics_replication_factor: int = Field(default=0, ge=0, le=32)
    # Content type of a record without a content-type header (JSON producers send none).
    default_content_type: Literal["application/msgpack", "application/json"] = "application/msgpack"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # /healthz fails when a worker's event loop has not beaten for this long (it beats every
    # second unless something blocks the loop): Kubernetes then restarts the pod.
    health_stale_s: float = Field(default=30.0, gt=0)

    @field_validator("reply_copy_headers")
    @classmethod
    def _copyable(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        own = sorted({n for n in names if n.lower() in REPLY_OWN_HEADERS})
        if own or not all(names):
            raise ValueError(
                f"cannot copy {own or 'an empty name'}: the reply sets those headers itself"
            )
        return names

    @model_validator(mode="before")
    @classmethod
    def _no_unknown_variables(cls, data: Any) -> Any:
        # Here rather than in load_settings: Settings() reads the environment as well.
        unknown = unknown_variables(os.environ)
        if unknown:
            raise ConfigError("; ".join(unknown))
        return data

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy with ``update`` applied; a key that is not a field is refused (pydantic
        would add it silently, and the setting meant would keep its old value)."""
        unknown = sorted(set(update or ()) - set(type(self).model_fields))
        if unknown:
            raise ConfigError(f"not a setting: {', '.join(unknown)}")
        return super().model_copy(update=update, deep=deep)

    def missing_connections(self) -> list[str]:
        """The connection variables this configuration needs and does not have."""
        needed = {
            "kafka_bootstrap": True,
            "redis_url": self.redis_mode == "on",
            "postgres_dsn": True,
        }
        return [variable(f) for f, need in needed.items() if need and not getattr(self, f)]

    def require_connections(self) -> Settings:
        """Raise ConfigError naming every missing connection setting; ``self`` otherwise."""
        missing = self.missing_connections()
        if missing:
            raise ConfigError(
                f"{', '.join(missing)} not set (connection settings have no default; "
                "`make services` writes them to .env)"
            )
        check_postgres_dsn(self.postgres_dsn, variable("postgres_dsn"))
        if self.redis_mode == "on":
            check_redis_url(self.redis_url, variable("redis_url"))
        return self


def variable(field: str) -> str:
    """The environment variable of a field: ``lease_ms`` -> ``CONSUMER_LEASE_MS``."""
    return PREFIX + field.upper()


def known_variables() -> frozenset[str]:
    """Every CONSUMER_* variable something reads: the fields, plus DOCUMENTED_EXTRA."""
    return frozenset(variable(f) for f in Settings.model_fields) | DOCUMENTED_EXTRA


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One message per CONSUMER_* variable nothing reads, with a did-you-mean if one is close.

    Case-insensitive, as the settings source is: ``consumer_lease_ms`` is read too.
    """
    known = known_variables()
    out = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(PREFIX) and upper not in known:
            close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]}?)" if close else ""
            out.append(f"unknown setting {name}{hint}")
    return out


def load_settings(*, require_connections: bool = True, **overrides: object) -> Settings:
    """Read settings from the environment; a bad, unknown or missing one raises ConfigError
    naming the variable, all on one line. ``require_connections=False`` is for the in-memory
    test harness, which connects to nothing."""
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"{field}: not a setting")
            else:
                problems.append(f"{variable(field)}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
    return settings.require_connections() if require_connections else settings
