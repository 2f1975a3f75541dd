"""Codecs: record bytes <-> payloads, chosen by the ``content-type`` header.

msgpack and JSON are built in; ``app.codec("application/avro", AvroCodec())`` adds others.
Avro (``consumer.codecs.avro``, extra ``avro``) and Protobuf (``consumer.codecs.protobuf``,
extra ``protobuf``) ship as optional modules, imported only by apps that use them.
See docs/codecs.md.
"""

from consumer.codecs.registry import (
    DEFAULT,
    Codec,
    Codecs,
    JsonCodec,
    MsgpackCodec,
    activate,
    active,
    encode_for,
    normalize,
)

__all__ = [
    "DEFAULT",
    "Codec",
    "Codecs",
    "JsonCodec",
    "MsgpackCodec",
    "activate",
    "active",
    "encode_for",
    "normalize",
]
