"""Identity of a message: (namespace, idempotency key, payload hash) and the validated payload.

Everything that can make a message invalid before it reaches its handler is detected here and
raised as an InvalidMessage subclass; nothing here touches a store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from consumer import keys
from consumer.codecs.registry import DEFAULT, Codecs
from consumer.constants import CONTENT_MSGPACK, HEADER_CONTENT_TYPE, MAX_KEY_BYTES
from consumer.dedup.hashing import HASH_VERSION, HASH_VERSIONS, payload_hash
from consumer.errors import BadKey, DecodeError, MissingKey, SchemaError
from consumer.handler import Handler
from consumer.message import Message
from consumer.types import Ident


@dataclass(frozen=True, slots=True)
class Identity:
    namespace: str
    key: str
    hash: str
    payload: BaseModel
    # The digest under an older canonical-form version, computed only when a record made
    # with that version is met (once per copy; None: the copy cannot be read that way).
    older: Callable[[int], str | None] = field(default=lambda _v: None, compare=False)

    @property
    def ident(self) -> Ident:
        """What the record is stored under: ``(namespace, key)``."""
        return (self.namespace, self.key)

    def same_payload(self, stored_hash: str, stored_version: int) -> bool | None:
        """Whether this copy carries the payload a record stored as ``stored_hash`` under
        canonical-form ``stored_version`` was made from; None for a version this code does
        not know (a record written by a newer release): neither duplicate nor conflict."""
        if stored_version == HASH_VERSION:
            return stored_hash == self.hash
        if stored_version not in HASH_VERSIONS:
            return None
        return self.older(stored_version) == stored_hash


def namespace_of(handler: Handler[Any, Any], msg: Message, tenant_header: str) -> str:
    tenant = msg.header(tenant_header) if tenant_header else None
    if tenant:
        name = _check_key(tenant, "tenant header")
        # The namespace is ``name@tenant`` and sits inside a Redis hash tag, ``lease:{ns}:key``:
        # an '@' would let a tenant share another namespace's key space, a brace would let
        # (tenant "a}:b", key "c") and (tenant "a", key "b}:c") share one Redis key.
        bad = sorted(keys.TENANT_FORBIDDEN.intersection(name))
        if bad:
            raise BadKey(f"tenant header contains {' '.join(repr(c) for c in bad)}")
        return keys.namespace(handler.name, name)
    return handler.name


def _check_key(raw: bytes | str | object, what: str) -> str:
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadKey(f"{what} is not valid UTF-8") from None
    elif isinstance(raw, str):
        text = raw
    elif isinstance(raw, int) and not isinstance(raw, bool):
        text = str(raw)
    else:
        raise BadKey(f"{what} must be a string, got {type(raw).__name__}")
    if not text:
        raise MissingKey(f"{what} is empty")
    try:
        size = len(text.encode())
    except UnicodeEncodeError:  # lone surrogates, e.g. from a JSON "\\ud800" escape
        raise BadKey(f"{what} is not valid Unicode text") from None
    if size > MAX_KEY_BYTES:
        raise BadKey(f"{what} is longer than {MAX_KEY_BYTES} bytes")
    if "\x00" in text:  # PostgreSQL text cannot hold NUL: the inbox insert would fail forever
        raise BadKey(f"{what} contains a NUL character")
    return text


def validate(
    handler: Handler[Any, Any],
    msg: Message,
    *,
    exact: bool = True,
    default_type: str = CONTENT_MSGPACK,
    codecs: Codecs = DEFAULT,
) -> BaseModel:
    """Decode by ``codecs`` (``default_type`` when the record has no content-type) and
    validate. The codec is given the schema: Avro and Protobuf decode by it."""
    ctype = msg.header_str(HEADER_CONTENT_TYPE) or default_type
    data = codecs.decode(msg.value, ctype, handler.schema, exact=exact)
    try:
        model: BaseModel = handler.schema.model_validate(data)
        return model
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise SchemaError(
            f"{handler.schema.__name__}: {where}: {first['msg']} ({exc.error_count()} error(s))"
        ) from None


def key_of(handler: Handler[Any, Any], msg: Message, payload: BaseModel) -> str:
    if handler.key_from == "payload":
        assert handler.key_fn is not None
        try:
            raw: object = handler.key_fn(payload)
        except Exception as exc:
            raise BadKey(f"key function failed: {type(exc).__name__}: {exc}") from None
        if raw is None:
            raise MissingKey("key function returned None")
        return _check_key(raw, "key")
    if handler.key_from == "record":
        if msg.key is None:
            raise MissingKey("record has no Kafka key")
        return _check_key(msg.key, "record key")
    header = msg.header(handler.key_header)
    if header is None:
        raise MissingKey(f"no {handler.key_header!r} header")
    return _check_key(header, f"{handler.key_header!r} header")


def identify(
    handler: Handler[Any, Any],
    msg: Message,
    tenant_header: str = "tenant",
    default_type: str = CONTENT_MSGPACK,
    codecs: Codecs = DEFAULT,
) -> Identity:
    """Decode, validate and derive identity, or raise InvalidMessage with its reason.

    ``default_type``: the content type of a record without the header
    (CONSUMER_DEFAULT_CONTENT_TYPE); ``codecs``: the app's registry (consumer/codecs/).
    The hash is the validated model's, whichever codec decoded it."""
    payload = validate(handler, msg, default_type=default_type, codecs=codecs)
    key = key_of(handler, msg, payload)
    ns = namespace_of(handler, msg, tenant_header)
    try:
        digest = payload_hash(payload, handler.hash_exclude)
    except UnicodeEncodeError:
        raise DecodeError("payload holds text that is not valid Unicode (lone surrogate)") from None
    return Identity(ns, key, digest, payload, _older_digests(handler, msg, default_type, codecs))


def _older_digests(
    handler: Handler[Any, Any], msg: Message, default_type: str, codecs: Codecs
) -> Callable[[int], str | None]:
    cache: dict[int, str | None] = {}

    def older(version: int) -> str | None:
        if version not in cache:
            cache[version] = (
                _digest_v1(handler, msg, default_type, codecs) if version == 1 else None
            )
        return cache[version]

    return older


def _digest_v1(
    handler: Handler[Any, Any], msg: Message, default_type: str, codecs: Codecs
) -> str | None:
    # Exactly as version 1 made it: JSON numbers read as floats, then model_dump. Called
    # inside the batch transaction: anything it raises would fail the batch on every
    # redelivery. A copy version 1 cannot hash (decimal.Overflow, a serialiser that raises)
    # was never recorded by it, so it is not the recorded payload: None, a conflict.
    try:
        payload = validate(handler, msg, exact=False, default_type=default_type, codecs=codecs)
        return payload_hash(payload, handler.hash_exclude, version=1)
    except Exception:
        return None
