"""Protobuf (extra ``protobuf``): one generated message class per model.

Decoding parses the bytes with the model's message class, turns the message into a dict
with ``MessageToDict(preserving_proto_field_name=True)`` (every field, its zero value
included, so a required ``0`` is not missing) and lets the model validate it. ``bytes``
fields come back as bytes (MessageToDict writes them as base64 text). Encoding is the
reverse: the model's dump, in protobuf's JSON mapping, through ``ParseDict``, serialised
deterministically. Unknown fields are kept by protobuf and ignored here (a newer producer's
field is not an error). Protobuf has no decimal: a ``Decimal`` is a ``string`` field; a
``datetime`` is a ``google.protobuf.Timestamp`` (read back in UTC); an enum field's
names are the Python enum's values.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import uuid
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

try:
    from google.protobuf import json_format
    from google.protobuf.descriptor import Descriptor, FieldDescriptor
    from google.protobuf.message import Message
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "consumer.codecs.protobuf needs protobuf: pip install 'dedup-consumer[protobuf]'"
    ) from exc

__all__ = ["CONTENT_PROTOBUF", "ProtobufCodec"]

CONTENT_PROTOBUF = "application/x-protobuf"


class ProtobufCodec:
    """A :class:`~consumer.codecs.Codec` for protobuf binary: ``messages`` maps each model to
    its generated message class (``{Payment: payment_pb2.Payment}``)."""

    def __init__(self, messages: Mapping[type[BaseModel], type[Message]]) -> None:
        self._messages = dict(messages)
        self._json_names: dict[type[BaseModel], bool] = {}

    def message_for(self, model: type[BaseModel]) -> type[Message]:
        """The message class of ``model``; LookupError naming the model if none."""
        try:
            return self._messages[model]
        except KeyError:
            raise LookupError(f"no protobuf message class for {model.__name__}") from None

    def decode(self, data: bytes, model: type[BaseModel]) -> object:
        message = self.message_for(model)()
        message.ParseFromString(data)
        json_names = self._json_names.get(model)
        if json_names is None:
            json_names = self._json_names[model] = _by_json_names(model, message.DESCRIPTOR)
        out = json_format.MessageToDict(
            message,
            always_print_fields_with_no_presence=True,
            preserving_proto_field_name=not json_names,
        )
        return _unbase64(out, message.DESCRIPTOR, json_names)

    def encode(self, value: object, model: type[BaseModel] | None) -> bytes:
        if model is None:
            raise ValueError("protobuf encodes a pydantic model (publish one, or name its model)")
        data = value.model_dump(by_alias=True) if isinstance(value, BaseModel) else value
        message = json_format.ParseDict(_jsonish(data), self.message_for(model)())
        encoded: bytes = message.SerializeToString(deterministic=True)
        return encoded


def _jsonish(value: Any) -> Any:
    """A python-mode dump in protobuf's JSON mapping (bytes as base64, Decimal as text)."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, dt.date):  # datetime too: RFC 3339, as Timestamp's JSON form reads
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonish(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonish(v) for v in value]
    return value


def _by_json_names(model: type[BaseModel], descriptor: Descriptor) -> bool:
    """Whether ``model`` validates by the message's JSON names (``orderId``, an
    ``alias_generator=to_camel`` model) rather than its field names (``order_id``). Encoding
    takes either (``ParseDict``); decoding must give the model the names it reads, else a
    model published through this codec is refused by its own schema (invalid_schema)."""
    keys = set()
    for name, info in model.model_fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else None
        keys.add(alias or info.alias or name)
    names = {f.name for f in descriptor.fields}
    return not keys <= names and keys <= {f.json_name for f in descriptor.fields}


def _unbase64(out: dict[str, Any], descriptor: Descriptor, json: bool = False) -> dict[str, Any]:
    """``out`` with the ``bytes`` fields of ``descriptor`` (nested ones too) as bytes; its
    keys are the fields' JSON names when ``json``, else their names."""
    for field in descriptor.fields:
        key = field.json_name if json else field.name
        if key not in out:
            continue
        value = out[key]
        if field.type == FieldDescriptor.TYPE_BYTES:
            out[key] = (
                [base64.b64decode(v) for v in value]
                if isinstance(value, list)
                else base64.b64decode(value)
            )
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            out[key] = _nested(value, field, json)
    return out


def _nested(value: Any, field: FieldDescriptor, json: bool) -> Any:
    sub = field.message_type
    if sub.GetOptions().map_entry:
        values = sub.fields_by_name["value"]
        if values.type == FieldDescriptor.TYPE_BYTES:
            return {k: base64.b64decode(v) for k, v in value.items()}
        if values.type == FieldDescriptor.TYPE_MESSAGE:
            return {k: _unbase64(v, values.message_type, json) for k, v in value.items()}
        return value
    if sub.full_name.startswith("google.protobuf."):
        return value  # well-known types have their own JSON form (Timestamp as text)
    if isinstance(value, list):
        return [_unbase64(v, sub, json) for v in value]
    return _unbase64(value, sub, json) if isinstance(value, dict) else value
