"""The result form's fast path for flat dicts gives exactly what the JSON round trip gives."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer import storable

_scalars = st.one_of(
    st.text(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True),
)


def _slow(value: Any) -> Any:
    saved = storable._flat_form
    storable._flat_form = lambda v: None  # type: ignore[assignment]
    try:
        return storable.result_form(value)
    finally:
        storable._flat_form = saved  # type: ignore[assignment]


def _outcome(value: Any) -> tuple[str, Any]:
    try:
        return "ok", storable.result_form(value)
    except storable.Unstorable as exc:
        return "unstorable", str(exc)


def _slow_outcome(value: Any) -> tuple[str, Any]:
    try:
        return "ok", _slow(value)
    except storable.Unstorable as exc:
        return "unstorable", str(exc)


@given(st.dictionaries(st.text(), _scalars, max_size=8))
def test_flat_dicts_take_the_same_form_both_ways(value: dict[str, Any]) -> None:
    fast, slow = _outcome(value), _slow_outcome(value)
    assert fast == slow
    if fast[0] == "ok":
        assert list(fast[1]) == list(slow[1])  # the same key order too


@pytest.mark.parametrize(
    "value",
    [
        {"a": "x\x00"},  # NUL: refused
        {"\ud800": 1},  # lone surrogate key
        {"n": 2**64},  # past msgpack
        {"n": -(2**63) - 1},
        {"f": 1e20},  # a float: the slow path's business
        {"b": True, "a": None, "c": -5},
    ],
)
def test_edge_values_agree(value: dict[str, Any]) -> None:
    assert _outcome(value) == _slow_outcome(value)
