"""The connection options every Kafka client of the package is built with: one place.

``client_options(settings)`` is spread into ``AIOKafkaConsumer``, ``AIOKafkaProducer`` and
``AIOKafkaAdminClient``: bootstrap servers, TLS (CA, client certificate and key, hostname
check) and SASL (PLAIN, SCRAM-SHA-256/512, OAUTHBEARER through a token provider). A setting
that cannot work (a missing file, SASL without credentials) is a ConfigError naming the
variable, raised before any connection. Passwords stay SecretStr until handed to the client
and are never part of a message.

A refused password or an untrusted certificate reaches the caller of ``start()`` as a bare
``KafkaConnectionError: Unable to bootstrap``: aiokafka only logs the cause, once per server.
:func:`connection_errors` collects those causes (and keeps their lines out of the log) and
:func:`describe_failure` turns them into one line a person can act on.

The option names are aiokafka's (aiokafka.readthedocs.io, "Security"); its
``create_ssl_context`` always checks the hostname, so the context is built here to honour
CONSUMER_KAFKA_SSL_CHECK_HOSTNAME.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import ssl
from collections.abc import Iterator, Sequence
from typing import Any

from consumer.errors import ConfigError, KafkaAuthError
from consumer.settings import Settings, variable


def client_options(s: Settings) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client: ``AIOKafkaConsumer(**client_options(s), ...)``."""
    opts: dict[str, Any] = {
        "bootstrap_servers": s.kafka_bootstrap,
        "security_protocol": s.kafka_security_protocol,
    }
    if s.kafka_security_protocol in ("SSL", "SASL_SSL"):
        opts["ssl_context"] = ssl_context(s)
    elif s.kafka_ssl_ca_file or s.kafka_ssl_cert_file:
        raise ConfigError(
            f"{variable('kafka_ssl_ca_file')}/{variable('kafka_ssl_cert_file')} are set but "
            f"{variable('kafka_security_protocol')}={s.kafka_security_protocol} uses no TLS "
            "(SSL or SASL_SSL does)"
        )
    if s.kafka_security_protocol.startswith("SASL_"):
        opts.update(_sasl(s))
    return opts


def ssl_context(s: Settings) -> ssl.SSLContext:
    """A client TLS context: the CA file (else the system's CAs), an optional client
    certificate, TLS 1.2 at least, hostname checked unless told otherwise."""
    for field in ("kafka_ssl_ca_file", "kafka_ssl_cert_file", "kafka_ssl_key_file"):
        path = getattr(s, field)
        if path and not os.path.isfile(path):
            raise ConfigError(f"{variable(field)}={path}: no such file")
    if bool(s.kafka_ssl_cert_file) != bool(s.kafka_ssl_key_file):
        raise ConfigError(
            f"{variable('kafka_ssl_cert_file')} and {variable('kafka_ssl_key_file')} "
            "go together (a client certificate needs its key)"
        )
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=s.kafka_ssl_ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = s.kafka_ssl_check_hostname
    if s.kafka_ssl_cert_file:
        try:
            ctx.load_cert_chain(
                s.kafka_ssl_cert_file,
                s.kafka_ssl_key_file,
                password=s.kafka_ssl_key_password.get_secret_value() or None,
            )
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{variable('kafka_ssl_cert_file')}/{variable('kafka_ssl_key_file')}: cannot "
                f"load the client certificate ({exc.reason or exc}); wrong key or key password?"
            ) from None
    return ctx


def _sasl(s: Settings) -> dict[str, Any]:
    mech = s.kafka_sasl_mechanism
    if mech == "OAUTHBEARER":
        if not s.kafka_sasl_oauth_token_provider:
            raise ConfigError(
                f"{variable('kafka_sasl_mechanism')}=OAUTHBEARER needs "
                f"{variable('kafka_sasl_oauth_token_provider')}=module:attribute"
            )
        return {"sasl_mechanism": mech, "sasl_oauth_token_provider": _token_provider(s)}
    password = s.kafka_sasl_password.get_secret_value()
    if not s.kafka_sasl_username or not password:
        raise ConfigError(
            f"{variable('kafka_security_protocol')}={s.kafka_security_protocol} with {mech} "
            f"needs {variable('kafka_sasl_username')} and {variable('kafka_sasl_password')}"
        )
    return {
        "sasl_mechanism": mech,
        "sasl_plain_username": s.kafka_sasl_username,
        "sasl_plain_password": password,
    }


def _token_provider(s: Settings) -> Any:
    spec = s.kafka_sasl_oauth_token_provider
    name = variable("kafka_sasl_oauth_token_provider")
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigError(f"{name}={spec}: expected module:attribute")
    try:
        found = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{name}={spec}: cannot import: {exc}") from None
    from aiokafka.abc import AbstractTokenProvider

    provider = found
    if not isinstance(found, AbstractTokenProvider) and callable(found):
        try:
            provider = found()
        except Exception as exc:
            raise ConfigError(f"{name}={spec}: the factory failed: {exc}") from None
    if not isinstance(provider, AbstractTokenProvider):
        raise ConfigError(f"{name}={spec}: not an aiokafka AbstractTokenProvider (or a factory)")
    return provider


class _Collect(logging.Filter):
    """Takes aiokafka's "Unable connect to ...: <error>" records: the error is kept, the
    line (repeated per bootstrap server and retry) is not printed."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if str(record.msg).startswith("Unable connect") and args:
            if isinstance(args[-1], BaseException):
                self.errors.append(args[-1])
                return False
        return True


_NOT_FOUND = "Topic %s not found in cluster metadata"  # aiokafka/cluster.py, at ERROR
QUIET_INTERVAL_S = 300.0


class _MissingTopicLines(logging.Filter):
    """Lets aiokafka's "Topic X not found in cluster metadata" through once per topic per
    QUIET_INTERVAL_S, with the count of the ones held back. aiokafka logs it on every
    metadata refresh for every topic a client has asked about (1,520 lines in 15 s in
    issue 16); the framework says it itself: the worker refuses to start without its source
    topics (consumer/topics.py), the relay counts and warns about the rows waiting for a
    missing destination (consumer/outbox/topics.py, ``report_missing``)."""

    def __init__(self, interval_s: float = QUIET_INTERVAL_S) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._until: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _NOT_FOUND or not isinstance(record.args, tuple) or not record.args:
            return True
        topic, now = str(record.args[0]), record.created
        if now < self._until.get(topic, 0.0):
            self._held[topic] = self._held.get(topic, 0) + 1
            return False
        if len(self._until) > 10_000:  # bounded: topics named by requesters' reply-to
            self._until.clear()
        self._until[topic] = now + self.interval_s
        held = self._held.pop(topic, 0)
        if held:
            record.msg = f"{_NOT_FOUND} (and {held} more such lines held back)"
        return True


_quiet = _MissingTopicLines()


def quiet_missing_topic_lines() -> None:
    """Install the filter above on aiokafka's cluster logger (idempotent)."""
    logger = logging.getLogger("aiokafka.cluster")
    if _quiet not in logger.filters:
        logger.addFilter(_quiet)


@contextlib.contextmanager
def connection_errors() -> Iterator[list[BaseException]]:
    """While open, the errors aiokafka met connecting (and only logged), oldest first."""
    collect = _Collect()
    logger = logging.getLogger("aiokafka")
    logger.addFilter(collect)
    try:
        yield collect.errors
    finally:
        logger.removeFilter(collect)


def describe_failure(
    exc: BaseException, s: Settings, seen: Sequence[BaseException] = ()
) -> KafkaAuthError | None:
    """One-line KafkaAuthError when ``exc`` (or an error aiokafka met on the way, ``seen``)
    is a refused login or an untrusted certificate; None for anything else."""
    from aiokafka.errors import SaslAuthenticationFailed

    where = f"Kafka at {s.kafka_bootstrap} ({s.kafka_security_protocol})"
    for err in (exc, *reversed(seen)):
        if isinstance(err, SaslAuthenticationFailed):
            detail = str(err).split(": ", 1)[-1]
            return KafkaAuthError(
                f"{where} refused the {s.kafka_sasl_mechanism} login of user "
                f"{s.kafka_sasl_username!r}: {detail} (check {variable('kafka_sasl_username')}"
                f" and {variable('kafka_sasl_password')})"
            )
        if isinstance(err, ssl.SSLCertVerificationError):
            return KafkaAuthError(
                f"{where}: the broker's certificate is not trusted: {err.verify_message} "
                f"(check {variable('kafka_ssl_ca_file')})"
            )
        if isinstance(err, ssl.SSLError):
            return KafkaAuthError(f"{where}: TLS handshake failed: {err.reason or err}")
    return None
