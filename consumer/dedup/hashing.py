"""Stable payload hashes over a versioned canonical form of a validated payload.

The same logical payload sent as msgpack or JSON, with fields in any order, gives the same
digest, in every process. Which values count is the canonical form's business:

* version 2 (current, consumer/dedup/canonical.py): every validated value the handler
  receives, secrets and ``Field(exclude=True)`` fields included, defaults left out;
* version 1 (records written before version 2): the model's ``model_dump`` minus the
  handler's ``hash_exclude``, as sorted compact JSON. Kept so a copy of a key recorded under
  version 1 is compared the way the record was made (see dedup/identity.py).

Every inbox record and done marker carries the version its hash was made with; a copy is
compared under that version, never across versions.
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
from consumer.dedup.canonical import encode_model

__all__ = [
    "HASH_ALG",
    "HASH_VERSION",
    "HASH_VERSIONS",
    "canonical_bytes",
    "marker_digest",
    "parse_marker_digest",
    "payload_hash",
]

HASH_VERSION = 2
HASH_VERSIONS = frozenset({1, 2})


def _sort_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical_v1(obj: Any) -> Any:
    """Version 1: ``obj`` (a python-mode dump) as JSON-compatible values. Frozen: never edit."""
    if obj is None or isinstance(obj, str | bool | int):
        return obj
    if isinstance(obj, float):
        return int(obj) if obj.is_integer() and abs(obj) < 2**53 else obj
    if isinstance(obj, Decimal):
        if not obj.is_finite():
            return str(obj)
        return "0" if obj.is_zero() else format(obj.normalize(), "f")
    if isinstance(obj, bytes | bytearray):
        return bytes(obj).hex()
    if isinstance(obj, Mapping):
        return {
            k if isinstance(k, str) else str(_canonical_v1(k)): _canonical_v1(v)
            for k, v in obj.items()
        }
    if isinstance(obj, Set):
        return sorted((_canonical_v1(v) for v in obj), key=_sort_key)
    if isinstance(obj, list | tuple):
        return [_canonical_v1(v) for v in obj]
    return _canonical_v1(to_jsonable_python(obj))


def canonical_bytes(
    model: BaseModel, exclude: Set[str] = frozenset(), version: int = HASH_VERSION
) -> bytes:
    """The canonical serialisation of ``model`` without the ``exclude`` fields."""
    if version == 2:
        return encode_model(model, exclude).encode()
    if version == 1:
        data = model.model_dump(mode="python", exclude=set(exclude) or None)
        return _sort_key(_canonical_v1(data)).encode()
    raise ValueError(f"unknown canonical-form version {version}")


def payload_hash(
    model: BaseModel, exclude: Set[str] = frozenset(), version: int = HASH_VERSION
) -> str:
    """BLAKE2b-128 of the canonical form, as 32 hex characters."""
    return hashlib.blake2b(canonical_bytes(model, exclude, version), digest_size=16).hexdigest()


def marker_digest(digest: str, version: int) -> str:
    """A done marker's hash field: ``<hex>`` for version 1 (as markers were before versions
    existed), ``<hex>/v<n>`` after, so a marker is read under the version it was made with."""
    return digest if version == 1 else f"{digest}/v{version}"


def parse_marker_digest(value: str) -> tuple[str, int]:
    """``(hex, version)`` of a done marker's hash field; unreadable versions come back as 0."""
    digest, sep, tail = value.partition("/v")
    if not sep:
        return digest, 1
    return digest, int(tail) if tail.isdigit() else 0
