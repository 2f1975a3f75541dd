"""An Avro schema derived from a pydantic model, for the types payloads commonly use.

| Python | Avro |
|---|---|
| ``str`` / ``int`` / ``float`` / ``bool`` / ``bytes`` | string / long / double / boolean / bytes |
| ``Decimal`` (``Field(max_digits=, decimal_places=)``) | bytes, decimal (precision 38 if unset) |
| ``datetime`` | long, timestamp-micros (read back in UTC) |
| ``date`` / ``UUID`` | int, date / string, uuid |
| ``Enum`` of text values that are Avro names | enum, symbols = the values |
| any other ``Enum`` | the type of its values |
| ``Literal[...]`` | the values' type |
| ``T | None``, ``A | B`` | union (``null`` first, default null when the field defaults to None) |
| ``list[T]``, ``tuple[T, ...]``, ``set[T]`` / ``dict[str, T]`` | array / map |
| a nested model | record (named by class; a second use refers to the name) |

Another class with an Avro name already used (a second module's ``Address``) is named
``<module>_<qualname>``: it has its own fields. Field names are the names a payload is
validated by (the alias where the field has one).
Anything else raises :class:`~consumer.errors.ConfigError` naming the field: give the schema
explicitly then (``AvroCodec(schemas={Model: {...}})``). Never reads or writes data.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import types
import typing
import uuid
from decimal import Decimal
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from consumer.errors import ConfigError

__all__ = ["avro_schema"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NOT_NAME = re.compile(r"[^A-Za-z0-9_]")
_PRIMITIVES: dict[Any, Any] = {
    str: "string",
    int: "long",
    float: "double",
    bool: "boolean",
    bytes: "bytes",
    dt.datetime: {"type": "long", "logicalType": "timestamp-micros"},
    dt.date: {"type": "int", "logicalType": "date"},
    uuid.UUID: {"type": "string", "logicalType": "uuid"},
}


def avro_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The Avro record schema of ``model`` (raises ConfigError for a type it cannot map)."""
    schema: dict[str, Any] = _Mapper().record(model)
    return schema


class _Mapper:
    def __init__(self) -> None:
        self.named: dict[type, str] = {}  # classes defined so far, by their Avro name
        self.taken: set[str] = set()

    def name_of(self, tp: type) -> tuple[str, bool]:
        """The Avro name of class ``tp`` and whether it is defined already (later uses refer
        to it). A second class with the same ``__name__`` (another module's ``Address``)
        gets its own name, the module's path joined in: referring to the first one's name
        would read and write it with the first class's fields, and drop the others."""
        if tp in self.named:
            return self.named[tp], True
        name = tp.__name__
        if name in self.taken:
            base = _NOT_NAME.sub("_", f"{tp.__module__}_{tp.__qualname__}")
            name, n = base, 2
            while name in self.taken:
                name, n = f"{base}_{n}", n + 1
        self.named[tp] = name
        self.taken.add(name)
        return name, False

    def record(self, model: type[BaseModel]) -> Any:
        name, defined = self.name_of(model)
        if defined:
            return name
        fields = []
        for fname, info in model.model_fields.items():
            key = info.validation_alias if isinstance(info.validation_alias, str) else None
            key = key or info.alias or fname
            if not _NAME.match(key):
                raise ConfigError(f"{name}.{fname}: {key!r} is not a valid Avro field name")
            try:
                avro = self.of(info.annotation, info.metadata, f"{name}.{fname}")
            except RecursionError:  # pragma: no cover - a model that contains itself
                raise ConfigError(f"{name}.{fname}: recursive models are not mapped") from None
            field: dict[str, Any] = {"name": key, "type": avro}
            if isinstance(avro, list) and avro[0] == "null" and _defaults_to_none(info):
                field["default"] = None
            fields.append(field)
        return {"type": "record", "name": name, "fields": fields}

    def of(self, tp: Any, metadata: list[Any], where: str) -> Any:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            inner, *extra = typing.get_args(tp)
            return self.of(inner, [*metadata, *extra], where)
        if tp in _PRIMITIVES:
            return _PRIMITIVES[tp]
        if tp is Decimal:
            return _decimal(metadata, where)
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return self.enum(tp, where)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return self.record(tp)
        if origin in (typing.Union, types.UnionType):
            return self.union(typing.get_args(tp), where)
        if origin is typing.Literal:
            return self.of(_one_type(typing.get_args(tp), where), [], where)
        if origin in (list, set, frozenset, tuple):
            return {"type": "array", "items": self.of(_item(tp, where), [], where)}
        if origin is dict:
            key, value = typing.get_args(tp) or (Any, Any)
            if key is not str:
                raise ConfigError(f"{where}: Avro maps have text keys, not {key!r}")
            return {"type": "map", "values": self.of(value, [], where)}
        raise ConfigError(f"{where}: no Avro mapping for {tp!r}; give the schema explicitly")

    def union(self, members: tuple[Any, ...], where: str) -> list[Any]:
        out = ["null"] if type(None) in members else []
        for member in members:
            if member is not type(None):
                out.append(self.of(member, [], where))
        return out

    def enum(self, tp: type[enum.Enum], where: str) -> Any:
        values = [m.value for m in tp]
        if all(isinstance(v, str) and _NAME.match(v) for v in values):
            name, defined = self.name_of(tp)
            if defined:
                return name
            return {"type": "enum", "name": name, "symbols": values}
        return self.of(_one_type(tuple(values), where), [], where)


def _defaults_to_none(info: FieldInfo) -> bool:
    return not info.is_required() and info.default_factory is None and info.default is None


def _decimal(metadata: list[Any], where: str) -> dict[str, Any]:
    places = next((m.decimal_places for m in metadata if getattr(m, "decimal_places", None)), None)
    digits = next((m.max_digits for m in metadata if getattr(m, "max_digits", None)), None)
    if places is None:
        raise ConfigError(
            f"{where}: a Decimal needs decimal_places (Field(decimal_places=...)) for Avro's"
            " decimal type"
        )
    return {"type": "bytes", "logicalType": "decimal", "precision": digits or 38, "scale": places}


def _one_type(values: tuple[Any, ...], where: str) -> type:
    kinds = {type(v) for v in values}
    if len(kinds) != 1:
        raise ConfigError(f"{where}: values of mixed types {sorted(k.__name__ for k in kinds)}")
    return kinds.pop()


def _item(tp: Any, where: str) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        raise ConfigError(f"{where}: only tuple[T, ...] maps to an Avro array")
    return args[0] if args else Any
