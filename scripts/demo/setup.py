"""Set-up of one demo run: its names, the services check, migrations and topics.

Each run gets its own prefix (``demo-<run>.``) for topics, consumer group, accounts and payment
ids, through ``PAYMENTS_TOPIC_PREFIX``, which ``handlers/app.py`` reads at import. So a run
never sees another run's messages, offsets or idempotency keys, and the demo can be re-run
without resetting anything. Nothing here deletes data.
"""

from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass
from types import ModuleType

from consumer import Settings
from consumer.constants import CONFLICT_SUFFIX, DLQ_SUFFIX
from consumer.db.migrate import migrate_dsn
from scripts.toolkit import topics

REQUESTED_PARTITIONS = 6
OTHER_PARTITIONS = 3


@dataclass(frozen=True, slots=True)
class Names:
    """Every name of one run, taken from the payments app imported under the run's prefix."""

    run: str
    group: str
    requested: str
    settled: str
    replies: str
    namespace: str  # the handler's; tenants are appended as "@tenant"
    tenants: tuple[str, ...]

    @property
    def dlq(self) -> str:
        return self.requested + DLQ_SUFFIX

    @property
    def conflicts(self) -> str:
        return self.requested + CONFLICT_SUFFIX

    @property
    def outputs(self) -> list[str]:
        return [self.settled, self.replies, self.dlq, self.conflicts]

    @property
    def namespaces(self) -> list[str]:
        return [self.namespace, *(f"{self.namespace}@{t}" for t in self.tenants)]


def load_app_for(run: str, tenants: int) -> tuple[Names, ModuleType]:
    """Import ``handlers.app`` under this run's prefix (set in the environment first)."""
    os.environ["PAYMENTS_TOPIC_PREFIX"] = f"demo-{run}."
    module = importlib.import_module("handlers.app")
    loadgen = importlib.import_module("handlers.loadgen")
    names = Names(
        run=run,
        group=module.app.group,
        requested=module.REQUESTED,
        settled=module.SETTLED,
        replies=loadgen.REPLIES,
        namespace=module.settle.name,
        tenants=tuple(f"tenant-{i + 1}" for i in range(tenants)),
    )
    return names, module


def unreachable(settings: Settings) -> list[str]:
    """Names of the services that do not accept a connection."""
    targets = {
        "Kafka": settings.kafka_bootstrap.split(",")[0],
        "Redis": settings.redis_url.split("://", 1)[-1].split("@")[-1].split("/")[0],
        "PostgreSQL": settings.postgres_dsn.split("://", 1)[-1].split("@")[-1].split("/")[0],
    }
    down = []
    for name, hostport in targets.items():
        host, _, port = hostport.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=2):
                pass
        except (OSError, ValueError):
            down.append(name)
    return down


async def migrate(settings: Settings, module: ModuleType) -> list[str]:
    applied: list[str] = await migrate_dsn(settings.postgres_dsn, module.app.migrations)
    return applied


async def create_topics(settings: Settings, names: Names) -> None:
    """The run's topics; returns once the broker lists every one of them."""
    spec = {names.requested: REQUESTED_PARTITIONS, **dict.fromkeys(names.outputs, OTHER_PARTITIONS)}
    await topics.create_topics(settings.kafka_bootstrap, spec, visible_within_s=10)
