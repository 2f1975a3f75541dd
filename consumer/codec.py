"""Bytes <-> Python values. msgpack by default, JSON when the content-type header says so.

Never validates: that is the schema's job (see dedup/identity.py).
"""

from __future__ import annotations

import json
from typing import Any

import msgpack

from consumer.constants import CONTENT_JSON, CONTENT_MSGPACK
from consumer.errors import DecodeError

_JSON_TYPES = {CONTENT_JSON, "json", "text/json"}
_MSGPACK_TYPES = {CONTENT_MSGPACK, "msgpack", "application/x-msgpack"}


def decode(value: bytes | None, content_type: str | None) -> Any:
    """Decode a record value. Raises DecodeError with a reason a person can act on."""
    if value is None:
        raise DecodeError("record has no value (tombstone)")
    ctype = (content_type or CONTENT_MSGPACK).split(";")[0].strip().lower()
    if ctype in _JSON_TYPES:
        try:
            return json.loads(value)
        except (UnicodeDecodeError, ValueError) as exc:
            raise DecodeError(f"not valid JSON: {exc}") from None
    if ctype in _MSGPACK_TYPES:
        try:
            return msgpack.unpackb(value, raw=False, strict_map_key=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise DecodeError(f"not valid msgpack: {type(exc).__name__}: {exc}") from None
        except Exception as exc:  # msgpack raises a few undocumented types on garbage
            raise DecodeError(f"not valid msgpack: {type(exc).__name__}: {exc}") from None
    raise DecodeError(f"unsupported content-type {ctype!r}")


def encode(obj: Any, content_type: str = CONTENT_MSGPACK) -> bytes:
    """Encode a JSON-compatible value as msgpack (default) or compact JSON."""
    if content_type == CONTENT_JSON:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed
