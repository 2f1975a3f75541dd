"""The second way to obtain the services: Kafka, Redis and PostgreSQL in containers.

``pytest --services=containers`` starts one container of each with testcontainers-python
before the tests are collected, exports the same three settings that ``scripts/services.sh``
writes to ``.env`` (``CONSUMER_KAFKA_BOOTSTRAP``, ``CONSUMER_REDIS_URL``,
``CONSUMER_POSTGRES_DSN``), so every fixture, test and subprocess sees them exactly as it sees
the local services, and removes the containers when the session ends. The default,
``--services=local``, changes nothing: the settings come from ``.env``.

Settings (environment):

- ``CONTAINERS_KAFKA_IMAGE`` / ``_REDIS_IMAGE`` / ``_POSTGRES_IMAGE``: the images,
  by default the official ``apache/kafka:3.9.1``, ``redis:7``, ``postgres:15``;
  ``scripts/containers.sh`` sets the ones it builds locally.
- ``CONTAINERS_NETWORK``: ``bridge`` (default; each port published on 127.0.0.1) or
  ``host`` (an engine without a bridge, as ``scripts/containers.sh`` starts one).
- ``CONTAINERS_KAFKA_PORT`` (19192), ``CONTAINERS_KAFKA_CONTROLLER_PORT`` (19193),
  ``CONTAINERS_REDIS_PORT`` (16479), ``CONTAINERS_PG_PORT`` (15532): not the local services'
  ports, so both can run side by side. Each service listens on the same port inside the
  container as outside, which is what lets one configuration serve both networks.

The broker settings are those of ``docker-compose.yml`` (and of ``scripts/services.sh``):
``tests/unit/test_services_containers.py`` checks that they agree.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV_NAMES = ("CONSUMER_KAFKA_BOOTSTRAP", "CONSUMER_REDIS_URL", "CONSUMER_POSTGRES_DSN")
START_TIMEOUT_S = float(os.environ.get("SERVICES_START_TIMEOUT", "90"))
CLUSTER_ID = "1fkc2L6cSOC9HAM6RhxyTg"  # any 16 bytes in base64; the same as docker-compose.yml


@dataclass(frozen=True)
class ContainerSettings:
    """Which images, which network, which ports."""

    kafka_image: str
    redis_image: str
    postgres_image: str
    network: str
    kafka_port: int
    controller_port: int
    redis_port: int
    pg_port: int

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str] = os.environ) -> ContainerSettings:
        network = env.get("CONTAINERS_NETWORK", "bridge")
        if network not in ("bridge", "host"):
            raise pytest.UsageError(f"CONTAINERS_NETWORK={network!r}: expected 'bridge' or 'host'")
        return cls(
            kafka_image=env.get("CONTAINERS_KAFKA_IMAGE", "apache/kafka:3.9.1"),
            redis_image=env.get("CONTAINERS_REDIS_IMAGE", "redis:7"),
            postgres_image=env.get("CONTAINERS_POSTGRES_IMAGE", "postgres:15"),
            network=network,
            kafka_port=int(env.get("CONTAINERS_KAFKA_PORT", "19192")),
            controller_port=int(env.get("CONTAINERS_KAFKA_CONTROLLER_PORT", "19193")),
            redis_port=int(env.get("CONTAINERS_REDIS_PORT", "16479")),
            pg_port=int(env.get("CONTAINERS_PG_PORT", "15532")),
        )

    @property
    def listen_host(self) -> str:
        # with host networking the container's sockets are the machine's: loopback only
        return "127.0.0.1" if self.network == "host" else "0.0.0.0"

    def env(self) -> dict[str, str]:
        """The settings the tests get, as ``scripts/services.sh`` writes them to ``.env``."""
        return {
            "CONSUMER_KAFKA_BOOTSTRAP": f"127.0.0.1:{self.kafka_port}",
            "CONSUMER_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "CONSUMER_POSTGRES_DSN": f"postgresql://postgres@127.0.0.1:{self.pg_port}/consumer",
        }


def kafka_environment(cs: ContainerSettings) -> dict[str, str]:
    """The broker's settings as the apache/kafka image reads them (KAFKA_FOO_BAR = foo.bar)."""
    return {
        "CLUSTER_ID": CLUSTER_ID,
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": f"1@localhost:{cs.controller_port}",
        "KAFKA_LISTENERS": f"PLAINTEXT://{cs.listen_host}:{cs.kafka_port},"
        f"CONTROLLER://localhost:{cs.controller_port}",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://127.0.0.1:{cs.kafka_port}",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "KAFKA_NUM_PARTITIONS": "6",
        "KAFKA_DEFAULT_REPLICATION_FACTOR": "1",
        "KAFKA_MIN_INSYNC_REPLICAS": "1",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
        "KAFKA_DELETE_TOPIC_ENABLE": "true",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS": "6",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_NUM_PARTITIONS": "6",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_GROUP_MIN_SESSION_TIMEOUT_MS": "1000",
        "KAFKA_BROKER_SESSION_TIMEOUT_MS": "4000",
        "KAFKA_BROKER_HEARTBEAT_INTERVAL_MS": "1000",
        "KAFKA_NUM_NETWORK_THREADS": "2",
        "KAFKA_NUM_IO_THREADS": "4",
        "KAFKA_LOG_RETENTION_HOURS": "24",
        "KAFKA_HEAP_OPTS": "-Xms256m -Xmx512m",
    }


def redis_command(cs: ContainerSettings) -> list[str]:
    return ["redis-server", "--port", str(cs.redis_port), "--bind", cs.listen_host,
            "--protected-mode", "no", "--save", "", "--appendonly", "no"]  # fmt: skip


def postgres_command(cs: ContainerSettings) -> list[str]:
    return ["postgres", "-c", f"port={cs.pg_port}", "-c", f"listen_addresses={cs.listen_host}",
            "-c", "max_connections=200"]  # fmt: skip


# ---------------------------------------------------------------- readiness


def _kafka_probe() -> Callable[[str, int], bool]:
    """scripts/kafka/probe.py's ``ready``: the same check as scripts/services.sh makes."""
    spec = importlib.util.spec_from_file_location("kafka_probe", ROOT / "scripts/kafka/probe.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    probe: Callable[[str, int], bool] = module.ready

    def ready(host: str, port: int) -> bool:
        try:
            return probe(host, port)
        except OSError:  # not listening yet, or the connection dropped mid-answer
            return False

    return ready


def _redis_ready(port: int) -> bool:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _postgres_ready(dsn: str) -> bool:
    import asyncpg

    async def check() -> bool:
        conn = await asyncpg.connect(dsn, timeout=2)
        try:
            return bool(await conn.fetchval("select 1") == 1)
        finally:
            await conn.close()

    try:
        return asyncio.run(check())
    except (TimeoutError, OSError, asyncpg.PostgresError):
        return False


# ---------------------------------------------------------------- start and stop


class Services:
    """The three containers of one test session."""

    def __init__(self, cs: ContainerSettings) -> None:
        self.cs = cs
        self.containers: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}

    def _container(self, name: str, image: str, port: int) -> Any:
        from testcontainers.core.container import DockerContainer

        c = DockerContainer(image).with_kwargs(
            labels={"dedup-consumer.tests": name},
            **({"network_mode": "host"} if self.cs.network == "host" else {}),
        )
        if self.cs.network == "bridge":  # published on loopback only, same port both sides
            c.ports[f"{port}/tcp"] = ("127.0.0.1", port)
        return c

    def start(self) -> None:
        cs = self.cs
        kafka = self._container("kafka", cs.kafka_image, cs.kafka_port)
        for key, value in kafka_environment(cs).items():
            kafka.with_env(key, value)
        redis = self._container("redis", cs.redis_image, cs.redis_port)
        redis.with_command(redis_command(cs))
        pg = self._container("postgres", cs.postgres_image, cs.pg_port)
        pg.with_env("POSTGRES_HOST_AUTH_METHOD", "trust").with_env("POSTGRES_DB", "consumer")
        pg.with_command(postgres_command(cs))
        env = cs.env()
        probe = _kafka_probe()
        checks: dict[str, Callable[[], bool]] = {
            "kafka": lambda: probe("127.0.0.1", cs.kafka_port),
            "redis": lambda: _redis_ready(cs.redis_port),
            "postgres": lambda: _postgres_ready(env["CONSUMER_POSTGRES_DSN"]),
        }
        t0 = time.monotonic()
        # Kafka first: its JVM is the slow one, the others start while it boots
        for name, c in (("kafka", kafka), ("redis", redis), ("postgres", pg)):
            self.containers[name] = c
            c.start()
        for name, ready in checks.items():
            self._wait(name, ready)
            self.seconds[name] = round(time.monotonic() - t0, 1)

    def _wait(self, name: str, ready: Callable[[], bool]) -> None:
        # Start-up polling, as scripts/services.sh does; never used inside a test.
        container = self.containers[name]
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            wrapped = container.get_wrapped_container()
            wrapped.reload()
            if wrapped.status != "running" or time.monotonic() > deadline:
                out, err = container.get_logs()
                tail = "\n".join((out + err).decode(errors="replace").splitlines()[-40:])
                why = f"not ready after {START_TIMEOUT_S}s"
                if wrapped.status != "running":
                    why = f"is {wrapped.status}"
                raise pytest.UsageError(f"{name} container ({container.image}) {why}:\n{tail}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Remove every container this session started (with its anonymous volumes)."""
        for container in self.containers.values():
            if container.get_wrapped_container() is not None:
                container.stop()
        self.containers.clear()


# ---------------------------------------------------------------- pytest hooks (from conftest)

_STASH = pytest.StashKey[Services]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--services",
        choices=("local", "containers"),
        default=os.environ.get("TEST_SERVICES", "local"),
        help="where Kafka, Redis and PostgreSQL come from: 'local' (default; .env of "
        "scripts/services.sh) or 'containers' (testcontainers; see tests/services_containers.py)",
    )


def configure(config: pytest.Config) -> None:
    """With ``--services=containers``: start the containers and export their settings."""
    if config.getoption("services") != "containers" or hasattr(config, "workerinput"):
        return
    services = Services(ContainerSettings.from_env())
    config.stash[_STASH] = services
    try:
        services.start()
    except BaseException:
        services.stop()
        raise
    os.environ.update(services.cs.env())  # over whatever .env said: these are the services now
    timings = ", ".join(f"{k} {v}s" for k, v in services.seconds.items())
    # on stderr: the terminal reporter is not registered yet when conftest's configure runs
    network = services.cs.network
    print(f"services: containers ({network} network) ready: {timings}", file=sys.stderr)


def pytest_unconfigure(config: pytest.Config) -> None:
    services = config.stash.get(_STASH, None)
    if services is not None:
        services.stop()
