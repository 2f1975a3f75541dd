"""Stable payload hashes over the canonical form of a validated payload.

Canonical form: the pydantic model dumped in JSON mode, minus the handler's ``hash_exclude``
fields, serialised with sorted keys and no whitespace. The same logical payload sent as msgpack
or JSON, with fields in any order, gives the same digest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Set
from typing import Any

from pydantic import BaseModel

from consumer.constants import HASH_ALG

__all__ = ["HASH_ALG", "canonical_bytes", "payload_hash"]


def _canonical_numbers(obj: Any) -> Any:
    # Floats that are whole numbers serialise as ints so 1.0 and 1 hash alike.
    if isinstance(obj, float) and obj.is_integer() and abs(obj) < 2**53:
        return int(obj)
    if isinstance(obj, dict):
        return {k: _canonical_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_canonical_numbers(v) for v in obj]
    return obj


def canonical_bytes(model: BaseModel, exclude: Set[str] = frozenset()) -> bytes:
    """The canonical serialisation of ``model`` without the ``exclude`` fields."""
    data = model.model_dump(mode="json", exclude=set(exclude) or None)
    return json.dumps(
        _canonical_numbers(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


def payload_hash(model: BaseModel, exclude: Set[str] = frozenset()) -> str:
    """BLAKE2b-128 of the canonical form, as 32 hex characters."""
    return hashlib.blake2b(canonical_bytes(model, exclude), digest_size=16).hexdigest()
