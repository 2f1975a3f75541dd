"""Stable payload hashes over the canonical form of a validated payload.

Canonical form: the pydantic model's values as JSON, minus the handler's ``hash_exclude``
fields, serialised with sorted keys and no whitespace, with canonical numbers (``1.0`` as ``1``,
``Decimal("1.50")`` as ``"1.5"``) and sets sorted. The same logical payload sent as msgpack or
JSON, with fields in any order, gives the same digest, in every process: a set's iteration
order depends on the per-process string hash seed, so a set dumped as it iterates would make
one payload hash differently on two workers and read as a conflict.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Set
from decimal import Decimal
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from consumer.constants import HASH_ALG

__all__ = ["HASH_ALG", "canonical_bytes", "payload_hash"]


def _sort_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical(obj: Any) -> Any:
    """``obj`` (a python-mode dump) as JSON-compatible values that are equal for equal data."""
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, float):
        # Whole floats as ints, so 1.0 and 1 hash alike (exact below 2**53).
        return int(obj) if obj.is_integer() and abs(obj) < 2**53 else obj
    if isinstance(obj, Decimal):
        if not obj.is_finite():
            return str(obj)
        return "0" if obj.is_zero() else format(obj.normalize(), "f")
    if isinstance(obj, bytes | bytearray):
        return bytes(obj).hex()
    if isinstance(obj, Mapping):
        return {
            k if isinstance(k, str) else str(_canonical(k)): _canonical(v) for k, v in obj.items()
        }
    if isinstance(obj, Set):
        return sorted((_canonical(v) for v in obj), key=_sort_key)
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    # datetime, UUID, Enum, ...: pydantic's JSON form, itself made canonical.
    return _canonical(to_jsonable_python(obj))


def canonical_bytes(model: BaseModel, exclude: Set[str] = frozenset()) -> bytes:
    """The canonical serialisation of ``model`` without the ``exclude`` fields."""
    data = model.model_dump(mode="python", exclude=set(exclude) or None)
    return _sort_key(_canonical(data)).encode()


def payload_hash(model: BaseModel, exclude: Set[str] = frozenset()) -> str:
    """BLAKE2b-128 of the canonical form, as 32 hex characters."""
    return hashlib.blake2b(canonical_bytes(model, exclude), digest_size=16).hexdigest()
