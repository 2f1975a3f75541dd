"""Avro binary encoding (fastavro, extra ``avro``), with the schema derived from the handler's
model (consumer/codecs/avro_schema.py) or given per model.

Schemaless: a record's value is the Avro binary encoding of one datum, no container file and
no schema registry lookup. ``schema_ids={Model: 42}`` adds Confluent's wire framing for that
model (a zero magic byte, then the schema id as 4 bytes big-endian, then the datum), and
decoding then requires that framing with that id: without a schema registry client the
writer's schema cannot be fetched, so a record written with another id is undecodable
rather than read with the wrong schema. Never validates: the model does.
"""

from __future__ import annotations

import enum
import io
import struct
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from consumer.codecs.avro_schema import avro_schema

try:
    import fastavro
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "consumer.codecs.avro needs fastavro: pip install 'dedup-consumer[avro]'"
    ) from exc

__all__ = ["CONTENT_AVRO", "AvroCodec"]

CONTENT_AVRO = "application/avro"
_FRAME = struct.Struct(">bI")  # Confluent: magic byte 0, schema id


class AvroCodec:
    """A :class:`~consumer.codecs.Codec` for Avro binary, one schema per model.

    ``schemas``: explicit Avro schemas (dicts, as JSON) for models whose derived schema is
    not the one producers use; every other model's is derived once, on first use.
    ``schema_ids``: models whose records carry Confluent's 5-byte framing, with its id.
    """

    def __init__(
        self,
        schemas: Mapping[type[BaseModel], Mapping[str, Any]] | None = None,
        *,
        schema_ids: Mapping[type[BaseModel], int] | None = None,
    ) -> None:
        self._given = dict(schemas or {})
        self._ids = dict(schema_ids or {})
        self._parsed: dict[type[BaseModel], Any] = {}

    def schema_for(self, model: type[BaseModel]) -> Any:
        """The parsed schema records of ``model`` are read and written with (cached).
        Raises ConfigError for a model whose schema cannot be derived: call it in a test."""
        parsed = self._parsed.get(model)
        if parsed is None:
            raw = self._given.get(model) or avro_schema(model)
            parsed = self._parsed[model] = fastavro.parse_schema(dict(raw))
        return parsed

    def decode(self, data: bytes, model: type[BaseModel]) -> object:
        schema = self.schema_for(model)
        start = 0
        if model in self._ids:
            start = self._unframe(data, self._ids[model])
        buf = io.BytesIO(data)
        buf.seek(start)
        datum = fastavro.schemaless_reader(buf, schema, None)
        if buf.tell() != len(data):
            raise ValueError(f"{len(data) - buf.tell()} bytes after the Avro datum")
        return datum

    def encode(self, value: object, model: type[BaseModel] | None) -> bytes:
        if model is None:
            raise ValueError("Avro encodes a pydantic model (publish one, or name its model)")
        datum = _datum(value.model_dump(by_alias=True) if isinstance(value, BaseModel) else value)
        buf = io.BytesIO()
        if model in self._ids:
            buf.write(_FRAME.pack(0, self._ids[model]))
        fastavro.schemaless_writer(buf, self.schema_for(model), datum)
        return buf.getvalue()

    @staticmethod
    def _unframe(data: bytes, expected: int) -> int:
        if len(data) < _FRAME.size or data[0] != 0:
            raise ValueError("no Confluent framing (magic byte 0 and a schema id)")
        _, schema_id = _FRAME.unpack_from(data)
        if schema_id != expected:
            raise ValueError(f"written with schema id {schema_id}, this codec reads {expected}")
        return _FRAME.size


def _datum(value: Any) -> Any:
    """A python-mode dump with enums as their values (Avro enum symbols are the values)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _datum(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_datum(v) for v in value]
    return value
