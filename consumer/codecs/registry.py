"""Codecs by content type: the registry that turns record bytes into what a schema validates,
and a payload into the bytes a published message or a reply carries.

A :class:`Codec` is two functions, ``decode(data, model)`` and ``encode(value, model)``; the
``model`` is the handler's schema, so a codec that needs a schema (Avro, Protobuf) derives or
looks it up from the model, and one that does not (msgpack, JSON) ignores it. A registry
(:class:`Codecs`) maps content types to codecs: ``application/msgpack`` and
``application/json`` (with their aliases) are always there; ``app.codec(content_type, codec)``
adds others. Content types are matched without their parameters and case
(``Application/JSON; charset=utf-8`` is JSON).

The payload hash never depends on the codec: it is computed from the validated model's
canonical form (consumer/dedup/canonical.py), so one payload sent as JSON, msgpack, Avro or
Protobuf hashes alike. Whatever a codec raises on bad bytes becomes a :class:`DecodeError`,
which the runtime dead-letters as ``undecodable``; an unknown content type is one too.

Encoding uses the *active* registry (:func:`active`): the app's, set for the task that
processes its batches (consumer/runtime/items.py), so ``ctx.publish(content_type=...)`` and
replies find the codecs the app registered. Never validates: that is the schema's job.
"""

from __future__ import annotations

import contextvars
import json
from typing import Any, Protocol, runtime_checkable

import msgpack
from pydantic import BaseModel

from consumer import codec as _wire
from consumer.constants import CONTENT_JSON, CONTENT_MSGPACK
from consumer.errors import DecodeError

__all__ = [
    "DEFAULT",
    "Codec",
    "Codecs",
    "JsonCodec",
    "MsgpackCodec",
    "activate",
    "active",
    "encode_for",
    "normalize",
]


@runtime_checkable
class Codec(Protocol):
    """Bytes <-> values for one content type.

    ``decode`` returns what ``model.model_validate`` takes (a dict, or a ``model`` instance)
    and raises anything on bad bytes (the registry reports it as ``undecodable``). ``encode``
    takes a pydantic model instance or JSON-compatible data (a handler's result) and, when
    the value is plain data, the model to encode it by (None when there is none).
    """

    def decode(self, data: bytes, model: type[BaseModel]) -> object: ...

    def encode(self, value: object, model: type[BaseModel] | None) -> bytes: ...


def plain(value: object) -> Any:
    """A model as JSON-compatible data (``model_dump(mode="json", by_alias=True)``), other
    values as they are. By alias: the names the model validates by (as the Avro and Protobuf
    codecs write it), so a consumer with the same schema reads what was published."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    return value


class MsgpackCodec:
    """msgpack (the default): maps with any keys, ``bin`` as bytes."""

    def decode(self, data: bytes, model: type[BaseModel]) -> object:
        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises a few undocumented types on garbage
            raise DecodeError(f"not valid msgpack: {type(exc).__name__}: {exc}") from None

    def encode(self, value: object, model: type[BaseModel] | None) -> bytes:
        return _wire.encode(plain(value), CONTENT_MSGPACK)


class JsonCodec:
    """Compact UTF-8 JSON; numbers read exactly (consumer/codec.py) unless ``exact=False``,
    the version-1 reading kept only to recompute version-1 hashes (dedup/identity.py)."""

    def __init__(self, *, exact: bool = True) -> None:
        self._parse_float = _wire._json_number if exact else float

    def decode(self, data: bytes, model: type[BaseModel]) -> object:
        try:
            return json.loads(data, parse_float=self._parse_float)
        except (UnicodeDecodeError, ValueError) as exc:
            raise DecodeError(f"not valid JSON: {exc}") from None

    def encode(self, value: object, model: type[BaseModel] | None) -> bytes:
        return _wire.encode(plain(value), CONTENT_JSON)


def normalize(content_type: str) -> str:
    """``Application/JSON; charset=utf-8`` -> ``application/json``."""
    return content_type.split(";", 1)[0].strip().lower()


_MSGPACK, _JSON, _JSON_V1 = MsgpackCodec(), JsonCodec(), JsonCodec(exact=False)
_BUILTIN: dict[str, Codec] = {
    CONTENT_MSGPACK: _MSGPACK,
    "msgpack": _MSGPACK,
    "application/x-msgpack": _MSGPACK,
    CONTENT_JSON: _JSON,
    "json": _JSON,
    "text/json": _JSON,
}
# Raw header spellings remembered per registry, so the common case is one dict lookup and no
# string work per message; bounded, since a producer may send any header text.
_MAX_SPELLINGS = 256


class Codecs:
    """Content type -> codec. Starts with msgpack and JSON; :meth:`register` adds more."""

    def __init__(self) -> None:
        self._codecs: dict[str, Codec] = dict(_BUILTIN)
        self._spellings: dict[str, Codec | None] = {}

    def register(self, content_type: str, codec: Codec) -> None:
        """Use ``codec`` for ``content_type`` (matched without parameters, any case)."""
        name = normalize(content_type)
        if not name or ("/" not in name and name not in _BUILTIN):
            raise ValueError(f"content type {content_type!r}: give a type/subtype")
        if not isinstance(codec, Codec):
            raise TypeError(f"{codec!r} is not a codec: it needs decode(data, model) and encode")
        self._codecs[name] = codec
        self._spellings.clear()

    @property
    def content_types(self) -> list[str]:
        """The content types this registry decodes, sorted."""
        return sorted(self._codecs)

    def get(self, content_type: str) -> Codec | None:
        """The codec of ``content_type`` as a header spells it, or None."""
        found = self._spellings.get(content_type, self)
        if found is not self:
            return found  # type: ignore[return-value]
        codec = self._codecs.get(normalize(content_type))
        if len(self._spellings) < _MAX_SPELLINGS:
            self._spellings[content_type] = codec
        return codec

    def decode(
        self, value: bytes | None, content_type: str, model: type[BaseModel], *, exact: bool = True
    ) -> object:
        """What ``model`` validates, from a record value; raises DecodeError (undecodable)."""
        if value is None:
            raise DecodeError("record has no value (tombstone)")
        codec = self.get(content_type)
        if codec is None:
            raise DecodeError(
                f"unknown content type: content-type {normalize(content_type)!r} has no codec"
                " (app.codec registers one)"
            )
        if codec is _JSON and not exact:
            codec = _JSON_V1
        try:
            return codec.decode(value, model)
        except DecodeError:
            raise
        except Exception as exc:
            name = normalize(content_type)
            raise DecodeError(f"not valid {name}: {type(exc).__name__}: {exc}") from None

    def encode(
        self, content_type: str, value: object, model: type[BaseModel] | None = None
    ) -> bytes:
        """``value`` as ``content_type``; ValueError for a content type with no codec."""
        codec = self.get(content_type)
        if codec is None:
            raise ValueError(
                f"content_type {content_type!r} has no codec; registered: "
                + ", ".join(t for t in self.content_types if "/" in t)
            )
        if model is None and isinstance(value, BaseModel):
            model = type(value)
        return codec.encode(value, model)


DEFAULT = Codecs()
_ACTIVE: contextvars.ContextVar[Codecs] = contextvars.ContextVar("codecs", default=DEFAULT)


def active() -> Codecs:
    """The registry encoding uses in this task: the app's while its batches run."""
    return _ACTIVE.get()


def activate(codecs: Codecs) -> None:
    """Make ``codecs`` the active registry of the current task (and tasks it starts)."""
    if _ACTIVE.get() is not codecs:
        _ACTIVE.set(codecs)


def encode_for(content_type: str, value: object, model: type[BaseModel] | None = None) -> bytes:
    """``value`` (a model or JSON-compatible data) encoded as ``content_type`` by the active
    registry: what ``ctx.publish`` and replies call. ValueError for an unknown type."""
    return _ACTIVE.get().encode(content_type, value, model)
