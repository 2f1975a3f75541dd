"""Every key the framework derives from names and keys users control, in one unambiguous form.

A derived key joins parts with ``:``; tenants and idempotency keys may themselves contain
``:``, so ``org`` + ``7:inv-3`` and ``org:7`` + ``inv-3`` would both read ``org:7:inv-3``.
Each part is therefore percent-escaped (``%`` as ``%25``, ``:`` as ``%3A``) before joining:
the ``:`` left in a derived key are separators only, and :func:`split` gives the parts back.
A part without ``%`` or ``:`` is unchanged, so keys of plain names read as before.

The namespace is ``<handler name>`` or ``<handler name>@<tenant>``. Handler names may not
contain ``@`` (nor ``:``, ``{``, ``}``), and tenants may not contain ``@``, ``{`` or ``}``:
so a namespace names one (handler, tenant) pair, no tenant can produce another handler's
namespace, and the namespace can sit inside a Redis Cluster hash tag (``lease:{ns}:key``)
whose slot no key can change.
"""

from __future__ import annotations

import hashlib
import re

TENANT_SEPARATOR = "@"
PART_SEPARATOR = ":"
# Characters a handler name may not contain: the separators above and the hash-tag braces.
NAME_FORBIDDEN = frozenset("@:{}")
# Characters a tenant may not contain: the namespace separator and the hash-tag braces.
TENANT_FORBIDDEN = frozenset("@{}")
_ESCAPED = re.compile(r"%(25|3[Aa])")
# Tags that open derived keys (reply:<ns>:<key>, dlq:<source>, conflict:<source>): a handler
# named like one would make its published keys <tag>:<key>:<index> look like tagged ones.
KEY_TAG_REPLY = "reply"
RESERVED_NAMES = frozenset({KEY_TAG_REPLY, "dlq", "conflict"})
MAX_NAME_BYTES = 200  # the inbox's (namespace, key) index holds at most ~2,700 bytes a row
# The longest idempotency key a consumer accepts (dedup/identity.py), so also the longest key
# the framework derives: a published event's key is a downstream consumer's idempotency key.
MAX_KEY_BYTES = 256
# Opens the digest of a derived key too long to spell out. escape() turns every % into %25,
# so no spelled-out derived key contains "%H": a digested key never equals one.
_DIGESTED = "%H"
_READABLE_BYTES = 120


def escape(part: str) -> str:
    """``part`` with ``%`` and ``:`` percent-escaped, so it can be joined with ``:``."""
    return part.replace("%", "%25").replace(":", "%3A")


def unescape(part: str) -> str:
    """The inverse of :func:`escape`."""
    return _ESCAPED.sub(lambda m: "%" if m.group(1) == "25" else ":", part)


def join(*parts: str) -> str:
    """Parts escaped and joined with ``:``: distinct parts give distinct keys.

    A key longer than :data:`MAX_KEY_BYTES` (escaping triples each ``:``, and a namespace
    and key of allowed lengths already exceed it) is its first bytes, ``%H`` and the
    BLAKE2b-256 of the whole: else a downstream consumer would dead-letter every event
    published for a long key as ``bad_key``, and outside systems cap their keys too.
    """
    text = PART_SEPARATOR.join(escape(p) for p in parts)
    raw = text.encode()
    if len(raw) <= MAX_KEY_BYTES:
        return text
    readable = raw[:_READABLE_BYTES].decode(errors="ignore")
    return readable + _DIGESTED + hashlib.blake2b(raw, digest_size=32).hexdigest()


def split(derived: str) -> list[str]:
    """The parts of a key made by :func:`join` (one that was not digested)."""
    return [unescape(p) for p in derived.split(PART_SEPARATOR)]


def namespace(handler_name: str, tenant: str | None) -> str:
    """The key space of a handler, and of one tenant of it when the message names one."""
    return f"{handler_name}{TENANT_SEPARATOR}{tenant}" if tenant else handler_name


def outside_key(ns: str, key: str) -> str:
    """``ctx.outside_key``: the idempotency key to give an outside system, ``<ns>:<key>``."""
    return join(ns, key)


def published_key(ns: str, key: str, index: int) -> str:
    """The ``idempotency-key`` of the ``index``-th message a handling published."""
    return join(ns, key, str(index))


def written_key(source: str, key: str) -> str:
    """The ``idempotency-key`` of a row :class:`consumer.Outbox` writes: ``<source>:<key>``.

    Two parts, where a handler's published key has three (``<ns>:<key>:<index>``) and a
    reply's starts with the reserved ``reply``, so no written key equals a derived one.
    """
    return join(source, key)


def reply_key(ns: str, key: str) -> str:
    """The ``idempotency-key`` of the reply to a request: ``reply:<ns>:<key>``.

    ``reply`` (like ``dlq`` and ``conflict``, the tags of dead letters and conflicts) is
    refused as a handler name, so no reply key equals a published key ``<ns>:<key>:<index>``.
    """
    return join(KEY_TAG_REPLY, ns, key)


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a handler name (the namespace), or None if it can."""
    if not name.strip():
        return "must not be empty"
    bad = sorted(NAME_FORBIDDEN.intersection(name))
    if bad:
        return (
            f"must not contain {' '.join(repr(c) for c in bad)} (the framework composes "
            "namespaces as name@tenant and derived keys as namespace:key; braces are the "
            "Redis Cluster hash tag)"
        )
    if name in RESERVED_NAMES:
        return f"is reserved: {sorted(RESERVED_NAMES)} open the framework's derived keys"
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        return "must not contain control characters (NUL cannot be stored)"
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        return "must be valid Unicode text (no lone surrogates)"
    if size > MAX_NAME_BYTES:
        return f"must be at most {MAX_NAME_BYTES} bytes in UTF-8"
    return None
