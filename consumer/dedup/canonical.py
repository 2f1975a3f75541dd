"""Canonical form version 2: every validated value the handler receives, in a stable spelling.

The form is built from the validated model's attributes, never from ``model_dump``: a dump
applies the schema's serialisers, so ``SecretStr`` comes out as ``**********``,
``Field(exclude=True)`` fields and ``@field_serializer`` masks hide what the handler reads.
Here secrets are revealed (for hashing only; the bytes never leave this process), excluded and
serialised-away fields are included, and every value is spelled so that two payloads read
alike only when the handler receives equal values:

* numbers (int, float, Decimal) by their exact value, at any precision or exponent: ``1``,
  ``1.0`` and ``Decimal("1.00")`` alike; ``-0.0`` as ``0``; NaN and the infinities by
  name. A float is its exact binary value, so a JSON ``0.1`` read into a ``float`` field and
  a msgpack float 0.1 agree;
* text, bytes, sets and lists each marked by kind, so ``"ab"`` and ``b"ab"``, or a set and a
  list, never read alike; dicts with their keys sorted; sets sorted (their iteration order
  depends on the process's string hash seed);
* datetimes and times by ISO 8601 with their UTC offset: the same instant at another offset is
  another payload (the handler can see the offset: a booking date, a local hour);
* enums by their value; UUIDs, dates, durations and pydantic's other types by their JSON form;
* a nested model by its class name and fields (a ``Card | Bank`` union member is part of
  what the handler receives);
* a model's fields by name, the model's extra fields (``extra="allow"``) included, marked
  apart from fields (an extra may be named like a field that has an alias); fields whose
  value equals their default are left out, so adding a field with a default to a schema keeps
  the hash of every payload that does not use it, and so are fields the payload did not set
  (their value comes from the schema: ``default_factory=uuid4`` must not make every copy
  another payload). A ``Literal`` field is always spelled out:
  it is how discriminated unions tell their members apart. Computed fields are derived from
  the others and are not part of the form.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import typing
from collections.abc import Mapping, Set
from decimal import Decimal
from enum import Enum
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined, to_jsonable_python

__all__ = ["encode_model"]


def _number(value: int | float | Decimal) -> str:
    d = value if isinstance(value, Decimal) else Decimal(value)  # exact for int and float
    if d.is_nan():
        return "NaN"
    if d.is_infinite():
        return "-Infinity" if d.is_signed() else "Infinity"
    if d.is_zero():
        return "0"
    # Trailing zeros stripped by hand: Decimal.normalize() rounds to the context's 28 digits
    # (10**30 and 10**30 + 1 would read alike) and raises Overflow past its exponent range.
    sign, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits))
    kept = text.rstrip("0")
    return ("-" if sign else "") + kept + "e" + str(exponent + len(text) - len(kept))


# Ints below this take :func:`_small_int`: their decimal text is short and cheap to make.
_SMALL = 10**18


def _small_int(value: int) -> str:
    """:func:`_number` of an int, without Decimal: its digits, trailing zeros as exponent."""
    if value == 0:
        return "0"
    digits = str(value)
    sign = ""
    if value < 0:
        sign, digits = "-", digits[1:]
    kept = digits.rstrip("0")
    return sign + kept + "e" + str(len(digits) - len(kept))


# What json.dumps(ensure_ascii=False) escapes: the quote, the backslash, controls below 0x20.
_ESCAPED = re.compile(r'["\\\x00-\x1f]')


def _text(s: str) -> str:
    # Lone surrogates raise UnicodeEncodeError in .encode() below; identify() reports them.
    if _ESCAPED.search(s) is None:
        return '"' + s + '"'  # what json.dumps gives, without its encoder (issue 15 profile)
    return json.dumps(s, ensure_ascii=False)


def _is_literal(info: FieldInfo) -> bool:
    return typing.get_origin(info.annotation) is typing.Literal


def _default_of(model: BaseModel, info: FieldInfo) -> Any:
    """The field's default, or PydanticUndefined when it has none we can compute safely."""
    if info.is_required() or _is_literal(info):
        return PydanticUndefined
    data = None
    if info.default_factory_takes_validated_data:
        data = {n: getattr(model, n) for n in type(model).model_fields}
    try:
        return info.get_default(call_default_factory=True, validated_data=data)
    except Exception:  # a user's factory that fails here: keep the field in the form
        return PydanticUndefined


# The encoded default of fields whose default is the same for every instance (no factory),
# by (model class, field name); None: no default to compare with. Digests are unchanged:
# only the work of computing it again for every message is saved.
_STATIC_DEFAULTS: dict[tuple[type[BaseModel], str], str | None] = {}


def _encoded_default(model: BaseModel, name: str, info: FieldInfo) -> str | None:
    key = (type(model), name)
    if key in _STATIC_DEFAULTS:
        return _STATIC_DEFAULTS[key]
    default = _default_of(model, info)
    encoded = None if default is PydanticUndefined else _encode(default)
    if info.default_factory is None:
        _STATIC_DEFAULTS[key] = encoded
    return encoded


def encode_model(model: BaseModel, exclude: Set[str] = frozenset()) -> str:
    """The canonical form of ``model`` without its top-level ``exclude`` fields."""
    return _model(model, exclude)


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    """What the form needs of one model field, worked out once per model class."""

    name: str
    text: str  # the name as the form spells it
    literal: bool
    info: FieldInfo


# The fields of each model class, in declaration order. Only the per-message work of reading
# them again is saved: the form (and every digest) is what the loop below always built.
_PLANS: dict[type[BaseModel], tuple[_Field, ...]] = {}


def _plan(cls: type[BaseModel]) -> tuple[_Field, ...]:
    plan = _PLANS.get(cls)
    if plan is None:
        plan = tuple(
            _Field(name, _text(name), _is_literal(info), info)
            for name, info in cls.model_fields.items()
        )
        _PLANS[cls] = plan
    return plan


def _model(model: BaseModel, exclude: Set[str] = frozenset(), tag: str = "") -> str:
    parts: list[tuple[str, str]] = []
    fields_set = model.model_fields_set
    for f in _plan(type(model)):
        name = f.name
        if name in exclude:
            continue
        if not f.literal and name not in fields_set:
            # Its value came from the schema (a default, a factory: uuid4, now), not from
            # the payload: a random default must not make every copy a conflict.
            continue
        value = _encode(getattr(model, name))
        default = _encoded_default(model, name, f.info)
        if default is not None and default == value:
            continue
        parts.append((f.text, value))
    for name, raw in (model.__pydantic_extra__ or {}).items():
        if name not in exclude:
            # Marked apart from fields: with an alias, {"amt": 5, "amount": 7} holds field
            # amount=5 and extra amount=7, and must not read as {"amt": 7, "amount": 5}.
            parts.append(("+" + _text(name), _encode(raw)))
    parts.sort()
    return "m" + tag + "{" + ",".join([k + ":" + v for k, v in parts]) + "}"


def _encode(obj: Any) -> str:
    # The exact types most payloads are made of first: for them the checks below could only
    # end in the same branch (an exact str is no Enum, an exact int no bool).
    kind = type(obj)
    if kind is str:
        return _text(obj)
    if kind is int and -_SMALL < obj < _SMALL:
        return _small_int(obj)
    # Two halves only to keep each readable; the order of the checks is the canonical form's
    # (bool before int, Enum before its value's type, ...) and must not change.
    scalar = _scalar(obj)
    return scalar if scalar is not None else _compound(obj)


def _scalar(obj: Any) -> str | None:
    """The form of a scalar (None, bool, Enum, number, text, bytes, secret), else None."""
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, Enum):
        return _encode(obj.value)
    if isinstance(obj, int | float | Decimal):
        return _number(obj)
    if isinstance(obj, str):
        return _text(obj)
    if isinstance(obj, bytes | bytearray | memoryview):
        return "b" + json.dumps(bytes(obj).hex())
    if isinstance(obj, SecretStr):
        return "s" + _text(obj.get_secret_value())
    if isinstance(obj, SecretBytes):
        return "s" + _encode(obj.get_secret_value())
    return None


def _compound(obj: Any) -> str:
    """The form of anything :func:`_scalar` does not take: models, containers, times, ..."""
    if isinstance(obj, BaseModel):
        # A nested model by its class too: in a union ``Card | Bank`` where Bank adds
        # ``bic: str = ""``, {"number": "x"} is a Card and {"number": "x", "bic": ""} a Bank
        # whose bic is left out as a default; the handler tells them apart by type.
        return _model(obj, tag=_text(type(obj).__name__))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = sorted(
            (_text(f.name), _encode(getattr(obj, f.name))) for f in dataclasses.fields(obj)
        )
        return "c{" + ",".join(f"{k}:{v}" for k, v in fields) + "}"
    if isinstance(obj, Mapping):
        items = sorted((_encode(k), _encode(v)) for k, v in obj.items())
        return "{" + ",".join(f"{k}:{v}" for k, v in items) + "}"
    if isinstance(obj, Set):
        return "#[" + ",".join(sorted(_encode(v) for v in obj)) + "]"
    if isinstance(obj, list | tuple):
        return "[" + ",".join(_encode(v) for v in obj) + "]"
    if isinstance(obj, dt.datetime | dt.time):
        return "t" + json.dumps(obj.isoformat())
    if isinstance(obj, dt.date):
        return "d" + json.dumps(obj.isoformat())
    if isinstance(obj, dt.timedelta):
        return "p" + _number(
            Decimal(obj.days * 86_400 + obj.seconds) + Decimal(obj.microseconds) / 10**6
        )
    # UUID, paths, URLs, IP addresses, ...: pydantic's JSON form, itself made canonical.
    return "x" + _encode(to_jsonable_python(obj))
