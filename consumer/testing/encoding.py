"""A pydantic model as the data a producer would have sent, for ``TestApp.send(model)``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic_core import to_jsonable_python

__all__ = ["as_sent"]


def as_sent(model: BaseModel, json_leaves: bool) -> Any:
    """``model`` as plain data: every field by its validation name, secrets revealed and
    ``Field(exclude=True)`` fields included. ``model_dump`` would mask or drop them, and the
    handler would then receive ``**********`` or fail validation. ``json_leaves``: only
    values JSON can carry (bytes as text); else bytes stay bytes (msgpack bin)."""
    return _plain(model, json_leaves)


def _plain(value: Any, json_leaves: bool) -> Any:
    if isinstance(value, BaseModel):
        out: dict[str, Any] = {}
        for name, info in type(value).model_fields.items():
            alias = info.validation_alias if isinstance(info.validation_alias, str) else None
            out[alias or info.alias or name] = _plain(getattr(value, name), json_leaves)
        for name, extra in (value.__pydantic_extra__ or {}).items():
            out[name] = _plain(extra, json_leaves)
        return out
    if isinstance(value, SecretStr | SecretBytes):
        return _plain(value.get_secret_value(), json_leaves)
    if isinstance(value, Mapping):
        return {_plain(k, json_leaves): _plain(v, json_leaves) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v, json_leaves) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes) and not json_leaves:
        return value
    return to_jsonable_python(value)
