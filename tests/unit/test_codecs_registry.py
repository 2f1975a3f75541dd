"""The codec registry: content types with parameters, aliases, registration, errors."""

from __future__ import annotations

import msgpack
import pytest
from pydantic import BaseModel

from consumer import App, ConfigError, DecodeError
from consumer.codecs import DEFAULT, Codecs, activate, active, encode_for, normalize
from consumer.constants import CONTENT_JSON, CONTENT_MSGPACK

pytestmark = pytest.mark.unit


class M(BaseModel):
    a: int


class Upper:
    """A toy codec: ASCII text ``A=<n>``."""

    def decode(self, data: bytes, model: type[BaseModel]) -> object:
        name, _, n = data.decode("ascii").partition("=")
        if name != "A":
            raise ValueError("expected A=<n>")
        return model(a=int(n))

    def encode(self, value: object, model: type[BaseModel] | None) -> bytes:
        assert isinstance(value, M)
        return f"A={value.a}".encode()


@pytest.mark.parametrize(
    ("given", "expected"),
    [("Application/JSON; charset=utf-8", "application/json"), (" text/x ", "text/x")],
)
def test_normalize_drops_parameters_and_case(given, expected):
    assert normalize(given) == expected


def test_builtins_are_there_under_their_aliases():
    codecs = Codecs()
    for ct in ("application/msgpack", "msgpack", "application/x-msgpack"):
        assert codecs.decode(msgpack.packb({"a": 1}), ct, M) == {"a": 1}
    for ct in ("application/json", "json", "text/json", "application/json;charset=UTF-8"):
        assert codecs.decode(b'{"a": 1}', ct, M) == {"a": 1}


def test_a_registered_codec_decodes_and_encodes_with_parameters_ignored():
    codecs = Codecs()
    codecs.register("Text/X-Upper", Upper())
    assert codecs.decode(b"A=5", "text/x-upper; v=1", M) == M(a=5)
    assert codecs.encode("text/x-upper", M(a=7)) == b"A=7"
    assert "text/x-upper" in codecs.content_types
    # Another registry (another app) does not see it.
    assert Codecs().get("text/x-upper") is None


def test_what_a_codec_raises_is_undecodable_and_names_the_type():
    codecs = Codecs()
    codecs.register("text/x-upper", Upper())
    with pytest.raises(DecodeError) as exc:
        codecs.decode(b"B=1", "text/x-upper", M)
    assert exc.value.reason == "undecodable"
    assert str(exc.value) == "not valid text/x-upper: ValueError: expected A=<n>"


def test_an_unknown_content_type_is_undecodable():
    with pytest.raises(DecodeError) as exc:
        Codecs().decode(b"a,b", "text/csv; header=present", M)
    assert exc.value.reason == "undecodable"
    assert str(exc.value).startswith("unknown content type: content-type 'text/csv'")


def test_a_tombstone_is_undecodable():
    with pytest.raises(DecodeError, match="tombstone"):
        Codecs().decode(None, CONTENT_MSGPACK, M)


def test_encoding_an_unknown_type_names_what_is_registered():
    with pytest.raises(ValueError, match=r"content_type 'text/csv' has no codec; registered: "):
        Codecs().encode("text/csv", {"a": 1})


def test_builtins_encode_models_and_data_alike():
    assert Codecs().encode(CONTENT_JSON, M(a=1)) == b'{"a":1}'
    assert Codecs().encode(CONTENT_MSGPACK, {"a": 1}) == msgpack.packb({"a": 1})


def test_the_json_codec_reads_v1_floats_only_when_asked():
    from decimal import Decimal

    exact = Codecs().decode(b'{"a": 12345678901234567.89}', CONTENT_JSON, M)
    v1 = Codecs().decode(b'{"a": 12345678901234567.89}', CONTENT_JSON, M, exact=False)
    assert exact == {"a": Decimal("12345678901234567.89")}
    assert v1 == {"a": 12345678901234567.89}


def test_app_codec_registers_and_refuses_what_is_not_a_codec():
    app = App("codec-reg")
    app.codec("text/x-upper", Upper())
    assert app.codecs.get("text/x-upper") is not None
    with pytest.raises(ConfigError, match="is not a codec"):
        app.codec("text/x-bad", object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="type/subtype"):
        app.codec("avro", Upper())


def test_encode_for_uses_the_active_registry():
    import contextvars

    codecs = Codecs()
    codecs.register("text/x-upper", Upper())

    def inside() -> bytes:
        activate(codecs)
        return encode_for("text/x-upper", M(a=3))

    assert contextvars.copy_context().run(inside) == b"A=3"
    assert active() is DEFAULT  # activation stays in the context it was made in
    with pytest.raises(ValueError):
        encode_for("text/x-upper", M(a=3))
