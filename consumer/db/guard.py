"""Statements a handler may not send on ``ctx.db``, refused before they reach PostgreSQL.

A handler runs inside the batch transaction, in a savepoint only the framework can name. What
it must not do is end or reshape that transaction, or change the session it shares with the
next batch: ``COMMIT``/``ROLLBACK`` would commit or drop half a batch (and later statements
would run in autocommit, applied again on the retry); ``SET`` (even ``LOCAL``: it outlives the
savepoint's release) changes the framework's own statements for the rest of the batch
(``transaction_read_only``, ``role``, ``statement_timeout``) and, at session level, later
batches on the pooled connection; ``PREPARE``/``DEALLOCATE`` leave or remove session objects.
A refused statement raises :class:`UnsafeStatement` at the call, with nothing sent, so the run
fails like any handler bug (``on_error`` decides) and the batch is intact.

Allowed: everything else, including the handler's own ``SAVEPOINT``/``RELEASE``/``ROLLBACK TO``
(nested inside the framework's savepoint, they cannot reach it), ``LOCK`` (held to the end of
the batch) and ``SET CONSTRAINTS``.
"""

from __future__ import annotations

import functools
import itertools
import re


class UnsafeStatement(ValueError):
    """A statement that would end, reshape or outlive the batch transaction; never sent."""


# Leading words refused outright, whatever follows.
_REFUSED = {
    "BEGIN": "opens a transaction",
    "START": "opens a transaction",
    "COMMIT": "ends the batch transaction",
    "END": "ends the batch transaction",
    "ABORT": "ends the batch transaction",
    "RESET": "changes the session's settings",
    "DISCARD": "drops the session's state",
    "PREPARE": "leaves a prepared statement or transaction in the session",
    "DEALLOCATE": "removes prepared statements the framework uses",
}
# Words after which a PL/pgSQL block starts a statement ("$BODY": the body's first word).
_PLPGSQL_STARTS = frozenset({"$BODY", ";", "BEGIN", "THEN", "ELSE", "LOOP", "EXCEPTION"})
_WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9$]*")


def _after_block_comment(query: str, i: int) -> int:
    """The index after the ``/* ... */`` starting at ``i`` (they nest in PostgreSQL)."""
    depth, i, n = 1, i + 2, len(query)
    while i < n and depth:
        if query.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif query.startswith("*/", i):
            depth, i = depth - 1, i + 2
        else:
            i += 1
    return i


def _after_quoted(query: str, i: int) -> int:
    """The index after the string or quoted identifier whose quote is at ``i``."""
    c, n = query[i], len(query)
    # '' (or "") inside doubles the quote; E'...' also escapes with a backslash, but
    # only an E that starts a token: in name'x\' (a typed literal) the E ends a word,
    # the backslash is a plain character and the quote after it closes the string.
    escapes = (
        c == "'"
        and i > 0
        and query[i - 1] in "eE"
        and (i < 2 or not (query[i - 2].isalnum() or query[i - 2] in "_$"))
    )
    i += 1
    while i < n:
        if escapes and query[i] == "\\":
            i += 2
        elif query[i] == c:
            if query.startswith(c * 2, i):
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return i


def _statements(query: str) -> list[list[str]]:
    """The top-level statements of ``query``, each as its upper-cased words, with comments,
    string and identifier literals and dollar-quoted bodies left out."""
    out: list[list[str]] = [[]]
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        if c == "-" and query.startswith("--", i):
            j = query.find("\n", i)
            i = n if j < 0 else j + 1
        elif c == "/" and query.startswith("/*", i):
            i = _after_block_comment(query, i)
        elif c in "'\"":
            i = _after_quoted(query, i)
        elif c == "$" and (m := re.match(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$", query[i:])):
            tag = m.group(0)
            j = query.find(tag, i + len(tag))
            if out[-1][:1] == ["DO"]:
                # A DO block's body runs as statements too: its words are read, so a SET or
                # set_config() in it is seen (see refusal()).
                body = query[i + len(tag) : n if j < 0 else j]
                out[-1] += ["$BODY"] + [w for b in _statements(body) for w in [*b, ";"]]
            i = n if j < 0 else j + len(tag)
        elif c == ";":
            out.append([])
            i += 1
        elif m := _WORD.match(query, i):
            out[-1].append(m.group(0).upper())
            i = m.end()
        else:
            i += 1
    return [s for s in out if s]


@functools.lru_cache(maxsize=4096)
def refusal(query: str) -> str | None:
    """Why ``query`` may not run on ``ctx.db``, or None if it may.

    Cached: handlers send the same few statement texts for every message, and reading one
    costs more than the round trip's client side (issue 15 profile)."""
    for words in _statements(query):
        first = words[0]
        if first in _REFUSED:
            return f"{first} {_REFUSED[first]}"
        if first == "ROLLBACK" and "TO" not in words[1:3]:
            return "ROLLBACK ends the batch transaction (ROLLBACK TO SAVEPOINT is allowed)"
        if first == "SET" and words[1:2] != ["CONSTRAINTS"]:
            return "SET changes settings the framework's statements and later batches share"
        if "SET_CONFIG" in words:
            return "set_config() changes settings the framework's statements share"
        if first == "DO" and any(
            w in ("SET", "RESET") and prev in _PLPGSQL_STARTS
            for prev, w in itertools.pairwise(words)
        ):
            return "SET in a DO block changes settings the framework's statements share"
    return None


def check(query: object) -> None:
    """Raise :class:`UnsafeStatement` if ``query`` may not run on ``ctx.db``."""
    if isinstance(query, str) and (why := refusal(query)):
        raise UnsafeStatement(
            f"ctx.db refused {query.strip()[:80]!r}: {why}; the framework owns the batch "
            "transaction and its session (docs/handlers.md#the-context)"
        )
