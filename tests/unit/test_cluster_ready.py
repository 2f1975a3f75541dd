"""Kafka client options, the topics an app needs, probe verdicts, error codes: no I/O."""

from __future__ import annotations

import ssl

import pytest
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed
from pydantic import BaseModel, SecretStr

from consumer import App, ConfigError, Context, Settings
from consumer.errors import KafkaAuthError, MigrationMismatch, TopicsMissing
from consumer.exitcodes import (
    RET_CONFIG,
    RET_ERROR,
    RET_KAFKA_AUTH,
    RET_MIGRATION,
    RET_TOPICS,
    of_error,
)
from consumer.kafka_config import client_options, describe_failure
from consumer.probes import liveness, readiness
from consumer.topics import needed

pytestmark = pytest.mark.unit

BASE = Settings(kafka_bootstrap="b:9093", redis_url="redis://r/0", postgres_dsn="postgresql://p/d")


def sasl(**update: object) -> Settings:
    fields = {
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "alice",
        "kafka_sasl_password": SecretStr("s3cret"),
        **update,
    }
    return BASE.model_copy(update=fields)


def test_plaintext_options_are_the_bootstrap_only():
    assert client_options(BASE) == {"bootstrap_servers": "b:9093", "security_protocol": "PLAINTEXT"}


def test_sasl_ssl_options_carry_the_login_and_a_hostname_checking_context():
    opts = client_options(sasl())
    assert opts["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (opts["sasl_plain_username"], opts["sasl_plain_password"]) == ("alice", "s3cret")
    ctx = opts["ssl_context"]
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not client_options(sasl(kafka_ssl_check_hostname=False))["ssl_context"].check_hostname


def test_the_password_is_never_shown():
    s = sasl()
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.model_dump())


@pytest.mark.parametrize(
    ("update", "named"),
    [
        ({"kafka_sasl_password": SecretStr("")}, "CONSUMER_KAFKA_SASL_PASSWORD"),
        ({"kafka_ssl_ca_file": "/no/such/ca.pem"}, "CONSUMER_KAFKA_SSL_CA_FILE=/no/such/ca.pem"),
        ({"kafka_ssl_cert_file": __file__}, "CONSUMER_KAFKA_SSL_KEY_FILE"),
        ({"kafka_sasl_mechanism": "OAUTHBEARER"}, "CONSUMER_KAFKA_SASL_OAUTH_TOKEN_PROVIDER"),
        (
            {"kafka_sasl_mechanism": "OAUTHBEARER", "kafka_sasl_oauth_token_provider": "os:sep"},
            "not an aiokafka AbstractTokenProvider",
        ),
        (
            {"kafka_security_protocol": "PLAINTEXT", "kafka_ssl_ca_file": __file__},
            "uses no TLS",
        ),
    ],
)
def test_a_setting_that_cannot_work_is_named_before_connecting(update, named):
    with pytest.raises(ConfigError, match=named.replace("/", ".")):
        client_options(sasl(**update))


def test_an_oauth_token_provider_is_imported_from_module_attribute():
    s = sasl(
        kafka_sasl_mechanism="OAUTHBEARER",
        kafka_sasl_oauth_token_provider="tests.unit.test_cluster_ready:Tokens",
    )
    assert isinstance(client_options(s)["sasl_oauth_token_provider"], Tokens)


from aiokafka.abc import AbstractTokenProvider  # noqa: E402


class Tokens(AbstractTokenProvider):  # type: ignore[misc]
    async def token(self) -> str:
        return "t"


def test_a_refused_login_seen_on_the_way_becomes_one_line():
    seen = [SaslAuthenticationFailed("Authentication failed: Invalid username or password")]
    err = describe_failure(KafkaConnectionError("Unable to bootstrap"), sasl(), seen)
    assert isinstance(err, KafkaAuthError)
    assert "refused the SCRAM-SHA-512 login of user 'alice'" in str(err)
    assert "s3cret" not in str(err) and "\n" not in str(err)
    assert describe_failure(KafkaConnectionError("x"), sasl(), [ConnectionRefusedError()]) is None


def test_start_errors_have_named_codes():
    assert of_error(KafkaAuthError("x")) == RET_KAFKA_AUTH
    assert of_error(TopicsMissing("x", ["t"])) == RET_TOPICS
    assert of_error(MigrationMismatch("x")) == RET_MIGRATION
    assert of_error(ConfigError("x")) == RET_CONFIG
    assert of_error(RuntimeError("x")) == RET_ERROR


class Order(BaseModel):
    n: int


def test_needed_lists_sources_then_the_framework_topics_and_declared_targets():
    app = App("g", settings=BASE)

    @app.handler("orders", "refunds", schema=Order, key="record", publishes=["settled"])
    async def h(p: Order, ctx: Context) -> None:
        return None

    assert [(n.topic, n.role, n.source) for n in needed(app)] == [
        ("orders", "source", "orders"),
        ("refunds", "source", "refunds"),
        ("orders.dlq", "dlq", "orders"),
        ("orders.conflicts", "conflicts", "orders"),
        ("refunds.dlq", "dlq", "refunds"),
        ("refunds.conflicts", "conflicts", "refunds"),
        ("settled", "publish", "orders"),
    ]


def test_publishes_is_checked_at_import():
    app = App("g", settings=BASE)
    with pytest.raises(ConfigError, match="invalid topics"):
        app.handler("orders", schema=Order, publishes=["bad topic"])(_noop)
    with pytest.raises(ConfigError, match="list of topics"):
        app.handler("orders", schema=Order, publishes="settled")(_noop)


def test_publishes_may_name_each_targets_model():
    app = App("g", settings=BASE)
    h = app.handler("orders", schema=Order, publishes={"settled": Order, "audit": Order})(_noop)
    assert h.publishes == ("settled", "audit")
    assert dict(h.publish_schemas) == {"settled": Order, "audit": Order}
    assert [n.topic for n in needed(app) if n.role == "publish"] == ["settled", "audit"]
    with pytest.raises(ConfigError, match="not a pydantic BaseModel"):
        app.handler("refunds", schema=Order, publishes={"settled": dict})(_noop)


async def _noop(p: Order, ctx: Context) -> None:
    return None


def test_readiness_needs_a_worker_and_every_check():
    assert readiness({})[0] is False
    ok = {"heartbeat": 1.0, "started": 1.0, "postgres": 1.0, "kafka": 1.0}
    assert readiness({"1": ok, "2": ok}) == (True, {"ready": True, "workers": 2, "failing": {}})
    ready, body = readiness({"1": ok, "2": {**ok, "postgres": 0.0}})
    assert not ready and body["failing"] == {"2": ["postgres"]}


def test_liveness_fails_on_a_stale_heartbeat_only():
    assert liveness({}, 30.0, 100.0)[0] is True  # nothing started yet: the process is alive
    assert liveness({"1": {"heartbeat": 80.0, "postgres": 0.0}}, 30.0, 100.0)[0] is True
    alive, body = liveness({"1": {"heartbeat": 60.0}}, 30.0, 100.0)
    assert not alive and body["heartbeat_age_s"] == {"1": 40.0}


def test_a_record_without_content_type_is_read_as_the_default_content_type():
    from consumer.dedup.identity import identify
    from consumer.errors import DecodeError
    from consumer.message import Message

    app = App("g", settings=BASE)
    handler = app.handler("orders", schema=Order, key="record")(_noop)
    json_record = Message("orders", 0, 0, b"k", b'{"n": 7}')
    with pytest.raises(DecodeError, match="msgpack"):  # msgpack, as before, by default
        identify(handler, json_record)
    assert identify(handler, json_record, default_type="application/json").payload.n == 7
    assert Settings.model_fields["default_content_type"].default == "application/msgpack"
