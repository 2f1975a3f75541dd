"""Bytes <-> Python values. msgpack by default, JSON when the content-type header says so.

Never validates: that is the schema's job (see dedup/identity.py).

JSON numbers are decoded exactly: a number with a fraction or exponent is a ``float`` when
the float holds exactly the value written (``1.5``, ``0.1``, ``1e20``), else a ``Decimal``
(``12345678901234567.89``), so a ``Decimal`` field gets the amount that was sent and is
hashed as such, while ``float`` and ``int`` fields validate as before. Exponents beyond
``_MAX_EXPONENT`` stay floats (``inf``, ``0.0``): no schema should turn ``1e999999999`` into
an integer of a billion digits.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation
from typing import Any

import msgpack

from consumer.constants import CONTENT_JSON, CONTENT_MSGPACK
from consumer.errors import DecodeError

_JSON_TYPES = {CONTENT_JSON, "json", "text/json"}
_MSGPACK_TYPES = {CONTENT_MSGPACK, "msgpack", "application/x-msgpack"}
_MAX_EXPONENT = 1000


def _json_number(text: str) -> float | Decimal:
    """A JSON number with a fraction or exponent, as the float it is or the exact Decimal."""
    value = float(text)
    try:
        exact = Decimal(text)
    except InvalidOperation:  # pragma: no cover - json only hands us valid numbers
        return value
    if abs(exact.adjusted()) > _MAX_EXPONENT or Decimal(repr(value)) == exact:
        return value
    return exact


def decode(value: bytes | None, content_type: str | None, *, exact: bool = True) -> Any:
    """Decode a record value. Raises DecodeError with a reason a person can act on.

    ``exact=False`` reads JSON numbers as floats, as versions before the canonical-form
    version 2 did: only to recompute a version-1 hash (dedup/identity.py)."""
    if value is None:
        raise DecodeError("record has no value (tombstone)")
    ctype = _base(content_type or CONTENT_MSGPACK)
    if ctype in _JSON_TYPES:
        try:
            return json.loads(value, parse_float=_json_number if exact else float)
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
    """Encode a JSON-compatible value as msgpack (default) or compact JSON.

    ``content_type`` is matched as :func:`decode` matches it (no parameters, any case, the
    aliases): bytes labelled ``Application/JSON; charset=utf-8`` must be JSON, since that is
    how a reader decodes them. ValueError for any other content type."""
    ctype = content_type if content_type in _FAST else _base(content_type)
    if ctype in _JSON_TYPES:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    if ctype not in _MSGPACK_TYPES:
        raise ValueError(f"content type {content_type!r} is neither msgpack nor JSON")
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


_FAST = {CONTENT_JSON, CONTENT_MSGPACK}  # the spellings the framework writes: no string work


def _base(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()
