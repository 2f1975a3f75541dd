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

    def message_for(self, model: type[BaseModel]) -> type[Message]:
        """The message class of ``model``; LookupError naming the model if none."""
        try:
            return self._messages[model]
        except KeyError:
            raise LookupError(f"no protobuf message class for {model.__name__}") from None

    def decode(self, data: bytes, model: type[BaseModel]) -> object:
        message = self.message_for(model)()
        message.ParseFromString(data)
        out = json_format.MessageToDict(
            message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True
        )
        return _unbase64(out, message.DESCRIPTOR)

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


def _unbase64(out: dict[str, Any], descriptor: Descriptor) -> dict[str, Any]:
    """``out`` with the ``bytes`` fields of ``descriptor`` (nested ones too) as bytes."""
    for field in descriptor.fields:
        if field.name not in out:
            continue
        value = out[field.name]
        if field.type == FieldDescriptor.TYPE_BYTES:
            out[field.name] = (
                [base64.b64decode(v) for v in value]
                if isinstance(value, list)
                else base64.b64decode(value)
            )
        elif field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            out[field.name] = _nested(value, field)
    return out


def _nested(value: Any, field: FieldDescriptor) -> Any:
    sub = field.message_type
    if sub.GetOptions().map_entry:
        values = sub.fields_by_name["value"]
        if values.type == FieldDescriptor.TYPE_BYTES:
            return {k: base64.b64decode(v) for k, v in value.items()}
        if values.type == FieldDescriptor.TYPE_MESSAGE:
            return {k: _unbase64(v, values.message_type) for k, v in value.items()}
        return value
    if sub.full_name.startswith("google.protobuf."):
        return value  # well-known types have their own JSON form (Timestamp as text)
    if isinstance(value, list):
        return [_unbase64(v, sub) for v in value]
    return _unbase64(value, sub) if isinstance(value, dict) else value
