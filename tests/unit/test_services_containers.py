"""The containers of ``--services=containers`` are configured as docker-compose.yml and
scripts/services.sh configure theirs: one broker setting drifting between them would make
the suite prove something about a broker nobody runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.services_containers import (
    ENV_NAMES,
    ContainerSettings,
    kafka_environment,
    postgres_command,
    redis_command,
)

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _compose_block(service: str, key: str, values: dict[str, str]) -> str:
    """The text of ``services.<service>.<key>`` in docker-compose.yml, ${VAR:-x} substituted.
    (No YAML parser among the dependencies; the file's layout is plain enough.)"""
    text = (ROOT / "docker-compose.yml").read_text()
    service_text = re.split(r"\n  (?=\w)", text.split("\nservices:\n", 1)[1])
    body = next(s for s in service_text if s.lstrip().startswith(f"{service}:"))
    block = body.split(f"\n    {key}:", 1)[1]
    block = re.split(r"\n    (?=\w)", block, maxsplit=1)[0]
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: values.get(m.group(1), m.group(2)), block)


def _settings(network: str = "bridge") -> ContainerSettings:
    return ContainerSettings.from_env(
        {
            "CONTAINERS_NETWORK": network,
            "CONTAINERS_KAFKA_PORT": "24092",
            "CONTAINERS_KAFKA_CONTROLLER_PORT": "24093",
            "CONTAINERS_REDIS_PORT": "24379",
            "CONTAINERS_PG_PORT": "24432",
        }
    )


def _compose_values(cs: ContainerSettings) -> dict[str, str]:
    return {
        "KAFKA_PORT": str(cs.kafka_port),
        "KAFKA_CONTROLLER_PORT": str(cs.controller_port),
        "REDIS_PORT": str(cs.redis_port),
        "PG_PORT": str(cs.pg_port),
        "LISTEN_HOST": cs.listen_host,
    }


@pytest.mark.parametrize("network", ["bridge", "host"])
def test_the_broker_settings_are_those_of_docker_compose(network: str) -> None:
    cs = _settings(network)
    block = _compose_block("kafka", "environment", _compose_values(cs))
    compose = {}
    for line in block.strip().splitlines():
        name, _, value = line.strip().partition(": ")
        compose[name] = value.strip('"')
    assert compose == kafka_environment(cs)


@pytest.mark.parametrize(
    ("service", "command"), [("redis", redis_command), ("postgres", postgres_command)]
)
def test_the_redis_and_postgres_commands_are_those_of_docker_compose(service, command) -> None:
    cs = _settings("host")
    block = _compose_block(service, "command", _compose_values(cs))
    compose = re.findall(r'"([^"]*)"', block)
    assert compose == command(cs)


def test_the_broker_settings_agree_with_scripts_services_sh() -> None:
    """Every tuning setting the local broker has, the container broker has too."""
    script = (ROOT / "scripts" / "services.sh").read_text()
    heredoc = script.split('server.properties" <<EOF\n', 1)[1].split("\nEOF", 1)[0]
    lines = [
        line for line in heredoc.splitlines() if "=" in line and not line.startswith("#")
    ]  # not the optional secured listener's $(kafka_secure_config) line
    local = dict(line.split("=", 1) for line in lines)
    env = kafka_environment(_settings())
    container = {
        k[6:].lower().replace("_", "."): v for k, v in env.items() if k.startswith("KAFKA_")
    }
    # addresses and paths differ on purpose (checked by the integration tests: they connect)
    skip = {
        "listeners",
        "advertised.listeners",
        "controller.quorum.voters",
        "log.dirs",
        "listener.security.protocol.map",  # names the optional SASL_SSL listener too
    }
    for key, value in local.items():
        if key not in skip:
            assert container.get(key) == value, key


def test_the_tests_get_the_same_three_settings_as_from_dotenv() -> None:
    script = (ROOT / "scripts" / "services.sh").read_text()
    written = set(re.findall(r"^(CONSUMER_\w+)=", script, flags=re.M))
    env = _settings().env()
    assert set(env) == written == set(ENV_NAMES)
    assert env["CONSUMER_KAFKA_BOOTSTRAP"] == "127.0.0.1:24092"
    assert env["CONSUMER_POSTGRES_DSN"] == "postgresql://postgres@127.0.0.1:24432/consumer"


def test_an_unknown_network_is_a_usage_error() -> None:
    with pytest.raises(pytest.UsageError, match="CONTAINERS_NETWORK='overlay'"):
        ContainerSettings.from_env({"CONTAINERS_NETWORK": "overlay"})


def test_defaults_are_the_official_images_and_not_the_local_services_ports() -> None:
    cs = ContainerSettings.from_env({})
    assert (cs.kafka_image, cs.redis_image, cs.postgres_image) == (
        "apache/kafka:3.9.1", "redis:7", "postgres:15")  # fmt: skip
    assert cs.network == "bridge"
    assert {cs.kafka_port, cs.redis_port, cs.pg_port}.isdisjoint({19092, 16379, 15432})
