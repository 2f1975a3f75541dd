"""Against the broker's SASL_SSL listener (``KAFKA_SECURE_PORT=... scripts/services.sh up``).

The worker consumes and its relay publishes through TLS (the CA of .services/tls, a client
certificate, hostname checked) with a SCRAM-SHA-512 login; a wrong password and an untrusted
certificate each end in one line naming the cause and RET_KAFKA_AUTH, not in aiokafka's
repeated "Unable connect" lines. Skipped without the listener (failed under CI=true).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import time

import msgpack
import pytest
from aiokafka.abc import AbstractTokenProvider
from pydantic import BaseModel, SecretStr

from consumer import App, Context
from consumer.errors import KafkaAuthError
from consumer.exitcodes import RET_KAFKA_AUTH, of_error
from consumer.settings import Settings
from consumer.topics import inspect
from tests.conftest import ROOT, app_settings, eventually, read_topic, running

pytestmark = pytest.mark.integration


@pytest.fixture
def secure(settings: Settings) -> Settings:
    """The session's settings pointed at the SASL_SSL listener, SCRAM-SHA-512 and mTLS."""
    bootstrap = os.environ.get("KAFKA_SECURE_BOOTSTRAP")
    if not bootstrap:
        msg = "no SASL_SSL listener: start the services with KAFKA_SECURE_PORT set"
        if os.environ.get("CI") == "true":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return settings.model_copy(
        update={
            "kafka_bootstrap": bootstrap,
            "kafka_security_protocol": "SASL_SSL",
            "kafka_ssl_ca_file": os.environ["KAFKA_SECURE_CA_FILE"],
            "kafka_ssl_cert_file": os.environ["KAFKA_SECURE_CERT_FILE"],
            "kafka_ssl_key_file": os.environ["KAFKA_SECURE_KEY_FILE"],
            "kafka_sasl_mechanism": "SCRAM-SHA-512",
            "kafka_sasl_username": os.environ["KAFKA_SECURE_USER"],
            "kafka_sasl_password": SecretStr(os.environ["KAFKA_SECURE_PASSWORD"]),
        }
    )


class Order(BaseModel):
    n: int


async def test_worker_consumes_and_relay_publishes_over_sasl_ssl(
    settings, secure, topics, producer, pg, unique
):
    topic = await topics("sec", partitions=2, extra=("sec-out",))
    out = f"sec-out-{unique}"
    app = App(f"g-{unique}", settings=app_settings(secure))

    @app.handler(topic, schema=Order, key="record", publishes=[out])
    async def handle(p: Order, ctx: Context) -> int:
        ctx.publish(out, {"n": p.n * 10}, key=ctx.idempotency_key)
        return p.n

    for n in range(5):  # produced over the plain listener: the same broker, the same topic
        await producer.send_and_wait(topic, msgpack.packb({"n": n}), key=f"k{n}".encode())

    async with running(app, app.settings) as worker:

        async def done() -> bool:
            return worker.stats.consumed >= 5 and worker.relay.published >= 5

        await eventually(done)
    assert worker.stats.by_outcome["applied"] == 5
    rows = await pg.fetchval("SELECT count(*) FROM dedup.inbox WHERE namespace = $1", handle.name)
    assert rows == 5
    published = sorted(msgpack.unpackb(r.value)["n"] for r in await read_topic(settings, out, 5))
    assert published == [0, 10, 20, 30, 40]


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_each_sasl_mechanism_logs_in(secure, topics, mechanism):
    topic = await topics("sec-mech")
    app = App("g-mech")
    app.handler(topic, schema=Order, key="record")(_noop)
    states = await inspect(app, secure.model_copy(update={"kafka_sasl_mechanism": mechanism}))
    assert {st.need.topic: st.partitions for st in states}[topic] == 3


async def _noop(p: Order, ctx: Context) -> None:
    return None


class UnsecuredTokens(AbstractTokenProvider):  # type: ignore[misc]
    """Tokens the broker's default (dev-only) OAUTHBEARER validator accepts: unsigned JWS."""

    async def token(self) -> str:
        def part(obj: dict[str, object]) -> str:
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

        now = int(time.time())
        claims = {"sub": os.environ["KAFKA_SECURE_USER"], "iat": now, "exp": now + 600}
        return f"{part({'alg': 'none'})}.{part(claims)}."


async def test_oauthbearer_logs_in_with_the_token_callback(secure, topics):
    topic = await topics("sec-oauth")
    app = App("g-oauth")
    app.handler(topic, schema=Order, key="record")(_noop)
    s = secure.model_copy(
        update={
            "kafka_sasl_mechanism": "OAUTHBEARER",
            "kafka_sasl_oauth_token_provider": f"{__name__}:UnsecuredTokens",
        }
    )
    states = await inspect(app, s)
    assert {st.need.topic: st.partitions for st in states}[topic] == 3


@pytest.mark.parametrize(
    ("update", "cause"),
    [
        ({"kafka_sasl_password": SecretStr("wrong-password")}, "refused the SCRAM-SHA-512 login"),
        ({"kafka_ssl_ca_file": ""}, "certificate is not trusted"),  # the system CAs only
    ],
    ids=["wrong_password", "untrusted_certificate"],
)
async def test_a_refused_connection_is_one_line_and_a_named_code(
    secure, topics, unique, caplog, update, cause
):
    topic = await topics("sec-bad")
    app = App(f"g-{unique}", settings=app_settings(secure.model_copy(update=update)))
    app.handler(topic, schema=Order, key="record")(_noop)
    from consumer.runtime.worker import Worker

    caplog.set_level(logging.INFO)
    with pytest.raises(KafkaAuthError) as info:
        await Worker(app, app.settings).run()
    message = str(info.value)
    assert cause in message and "\n" not in message
    assert "wrong-password" not in message  # the secret is never part of a message
    assert of_error(info.value) == RET_KAFKA_AUTH
    # aiokafka's own "Unable connect" line (one per server and retry) is kept out of the log.
    assert not [r for r in caplog.records if r.getMessage().startswith("Unable connect")]


def test_consumer_worker_exits_with_ret_kafka_auth_on_a_wrong_password(secure, unique):
    env = {
        **os.environ,
        "CONSUMER_KAFKA_BOOTSTRAP": secure.kafka_bootstrap,
        "CONSUMER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "CONSUMER_KAFKA_SSL_CA_FILE": secure.kafka_ssl_ca_file,
        "CONSUMER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        "CONSUMER_KAFKA_SASL_USERNAME": secure.kafka_sasl_username,
        "CONSUMER_KAFKA_SASL_PASSWORD": "wrong-password",
        "OBSERVED_GROUP": f"g-{unique}",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "consumer", "worker", "tests.apps.observed:app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "refused the SCRAM-SHA-256 login" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.returncode == RET_KAFKA_AUTH
