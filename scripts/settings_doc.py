"""docs/settings.md from consumer/settings.py: every field, its variable, type, default and the
comment written above (or beside) it. ``python -m scripts.settings_doc`` rewrites the page;
tests/unit/test_settings_doc.py fails when the page and the class differ.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from consumer.settings import Settings, variable

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "consumer" / "settings.py"
PAGE = ROOT / "docs" / "settings.md"
_FIELD = re.compile(r"^    (\w+): ")

# Fields without a comment in consumer/settings.py: described here (a test requires one for
# every field, so a new setting cannot reach the page blank).
DESCRIBED = {
    "kafka_bootstrap": "Kafka bootstrap servers, `host:port[,host:port]`.",
    "redis_url": "Redis (any node of a cluster with CONSUMER_REDIS_CLUSTER=true); not needed "
    "with CONSUMER_REDIS_MODE=off.",
    "postgres_dsn": "PostgreSQL, the fence: inbox, offsets, outbox.",
    "batch_max_records": "Most records of one partition in one batch transaction.",
    "fetch_timeout_ms": "Longest wait of one fetch when nothing is there.",
    "lease_wait_ms": "How long a key leased by another worker is waited for before the record "
    "decides or the message is retried later.",
    "dedup_window_s": "How long inbox records are kept: a copy older than this is not "
    "recognised as a duplicate.",
    "done_cache_s": "Lifetime of a Redis done marker (the fast path; PostgreSQL stays the fence).",
    "handler_timeout_s": "Per handler call (a handler may set its own `timeout_s`).",
    "max_attempts": "Tries of a transient failure before CONSUMER_EXHAUSTED_OUTCOME applies.",
    "retry_backoff_ms": "First pause of a partition after a transient failure; doubles.",
    "retry_backoff_max_ms": "Cap of that pause.",
    "retry_topic_backoff_ms": 'retry="topics" handlers: delay before the first retry via '
    "`<topic>.retry`.",
    "retry_topic_backoff_multiplier": "Factor of each next retry's delay.",
    "retry_topic_backoff_max_ms": "Cap of the retry delay.",
    "redis_retry_s": "How often a worker running degraded (Redis away) tries Redis again.",
    "pg_pool_max": "PostgreSQL connections per worker process.",
    "session_timeout_ms": "A silent member is dropped from the group after this.",
    "heartbeat_interval_ms": "Group heartbeat period (at most a third of the session timeout).",
    "max_poll_interval_ms": "Also the rebalance timeout: how long a rebalance may wait for a "
    "member's in-flight batch.",
    "static_membership": "One `group.instance.id` per host and worker slot (docs/operations.md).",
    "relay_enabled": "Run the outbox relay inside each worker.",
    "relay_batch": "Outbox rows per relay tick.",
    "relay_poll_ms": "Relay tick period when the outbox is idle.",
    "outbox_retention_s": "How long published outbox rows are kept.",
    "cleanup_interval_s": "Period of the retention clean-up.",
    "cleanup_batch": "Rows deleted per clean-up statement.",
    "hash_keys_in_logs": "Log idempotency keys as a keyed hash (`b2:...`), not in clear.",
    "log_json": "Log JSON lines instead of readable ones.",
    "status_interval_s": "Period of the worker's status line.",
    "restart_backoff_s": "First delay before the supervisor restarts a dead worker; doubles.",
    "restart_backoff_max_s": "Cap of that delay.",
    "metrics_port": "Serve /metrics, /healthz and /readyz on this port (0: off).",
    "metrics_dir": "Directory of the multiprocess metrics files (default: a temporary one).",
    "tenant_header": "Header whose value, if present, scopes keys to a tenant (`name@tenant`).",
    "redis_mode": "`off`: PostgreSQL alone, no Redis accelerator.",
    "kafka_security_protocol": "How clients reach Kafka; managed clusters want SASL_SSL.",
    "kafka_ssl_key_file": "Key of CONSUMER_KAFKA_SSL_CERT_FILE (PEM).",
    "kafka_ssl_key_password": "Password of that key, if it is encrypted.",
    "kafka_sasl_mechanism": "SASL mechanism with SASL_PLAINTEXT or SASL_SSL.",
    "kafka_sasl_username": "SASL user (PLAIN, SCRAM).",
    "kafka_sasl_password": "SASL password (PLAIN, SCRAM).",
    "log_level": "Level of the root logger (aiokafka's own stays at WARNING).",
}

HEAD = """# Settings reference

Generated from `consumer/settings.py` by `python -m scripts.settings_doc`; a test fails
when the two differ. Every setting is an environment variable with the prefix `CONSUMER_`,
read once at start and validated (docs/operations.md#settings); a `CONSUMER_*` variable
that is not listed here is refused. Connection settings have no default. Passwords
(`SecretStr`) are never logged.

| variable | type | default | what it is |
|---|---|---|---|
"""


def comments() -> dict[str, str]:
    """Field -> the comment block right above its line, plus a trailing ``# ...`` on it."""
    out: dict[str, str] = {}
    block: list[str] = []
    for line in SOURCE.read_text().splitlines():
        stripped = line.strip()
        if line.startswith("    # "):
            if not stripped.startswith("# ----"):  # a section title, not a description
                block.append(stripped[2:])
            continue
        m = _FIELD.match(line)
        if m and m.group(1) in Settings.model_fields:
            text = block[:] if m.group(1) not in ("redis_url", "postgres_dsn") else []
            if "  # " in line:
                text.append(line.split("  # ", 1)[1])
            out[m.group(1)] = " ".join(text)
        if not line.startswith("    # "):
            block = [] if not (m and line.rstrip().endswith("(")) else block
    return out


def _default(value: Any) -> str:
    if isinstance(value, SecretStr):
        return '`""`' if not value.get_secret_value() else "`**********`"
    if value == "":
        return "*(none)*"
    return f"`{value}`"


def _type(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    text = text.replace("pydantic.types.SecretStr", "SecretStr").replace("<class '", "")
    return text.replace("'>", "").replace("|", "\\|")


def render() -> str:
    notes = comments()
    rows = []
    for name, field in Settings.model_fields.items():
        note = " ".join(x for x in (DESCRIBED.get(name, ""), notes.get(name, "")) if x)
        note = note.replace("|", "\\|")
        rows.append(
            f"| `{variable(name)}` | {_type(field.annotation)} | {_default(field.default)} "
            f"| {note} |"
        )
    return HEAD + "\n".join(rows) + "\n"


def main() -> int:
    PAGE.write_text(render())
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(Settings.model_fields)} settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
