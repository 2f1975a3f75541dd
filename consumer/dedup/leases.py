"""Leases and done markers in Redis: an accelerator, never the fence.

* ``lease:{ns}:key``  = owner token, ``SET NX PX``: keeps two workers from running one key at once.
* ``done:{ns}:key``   = ``status:hash``, TTL = done-cache window: spares a duplicate the inbox
  claim. Written only after the database commit. A hint only: the batch confirms every marker
  against the inbox (consumer/runtime/batch.py), since Redis may hold markers PostgreSQL lost.

One round trip per batch: acquisition is one Lua call over all keys of the batch; the done
markers and the release (compare-and-delete) are one more Lua call after commit. If Redis loses
every key, the PostgreSQL inbox still decides; only speed is lost. This module never decides
an outcome on its own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import redis.asyncio as aioredis

from consumer.constants import done_key, lease_key
from consumer.types import Ident

LeaseState = Literal["acquired", "held", "done"]

# For each (done, lease) pair: the done marker if present; else try to take the lease.
# Returns a flat list: 'D', marker | 'A', '' | 'H', ''.
_ACQUIRE_LUA = """
local out = {}
for i = 1, #KEYS, 2 do
  local d = redis.call('GET', KEYS[i])
  if d then
    out[#out+1] = 'D'; out[#out+1] = d
  else
    local cur = redis.call('GET', KEYS[i+1])
    if cur == ARGV[1] then
      redis.call('PEXPIRE', KEYS[i+1], ARGV[2])
      out[#out+1] = 'A'; out[#out+1] = ''
    elseif cur then
      out[#out+1] = 'H'; out[#out+1] = ''
    else
      redis.call('SET', KEYS[i+1], ARGV[1], 'PX', ARGV[2])
      out[#out+1] = 'A'; out[#out+1] = ''
    end
  end
end
return out
"""

# After commit, in one call: set the done markers (KEYS[1..n], values ARGV[4..3+n], TTL ARGV[2]
# seconds), then compare-and-delete the leases (KEYS[n+1..]) that still carry our token.
# One command with many arguments costs the client far less than a pipeline of n SETs.
_FINISH_LUA = """
local n = tonumber(ARGV[3])
for i = 1, n do
  redis.call('SET', KEYS[i], ARGV[3 + i], 'EX', ARGV[2])
end
local released = 0
for i = n + 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i]); released = released + 1
  end
end
return released
"""

# Compare-and-extend: renew only leases that still carry our token.
_RENEW_LUA = """
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2]); n = n + 1
  end
end
return n
"""


@dataclass(frozen=True, slots=True)
class LeaseResult:
    state: LeaseState
    status: str = ""  # for "done": "done" or "rejected"
    hash: str = ""  # for "done": the stored payload hash


@dataclass(frozen=True, slots=True)
class DoneMarker:
    namespace: str
    key: str
    status: str
    hash: str


class LeaseStore(Protocol):
    """What the runtime needs from the accelerator. Implementations: Redis, memory, none.

    Every method is one round trip for the whole batch. Nothing here is a fence: a lease only
    keeps two workers from running one key at the same time, and a done marker only spares a
    duplicate its inbox claim; the PostgreSQL inbox decides (docs/design.md, "Why").
    """

    async def acquire(self, idents: Sequence[Ident], token: str, ttl_ms: int) -> list[LeaseResult]:
        """For each key, in order: its done marker if one is set (``done``); else take or
        extend its lease for ``token`` for ``ttl_ms`` (``acquired``); else ``held`` (another
        token holds it)."""
        ...

    async def renew(self, idents: Sequence[Ident], token: str, ttl_ms: int) -> int:
        """Extend to ``ttl_ms`` the leases that still carry ``token``; returns how many did."""
        ...

    async def finish(
        self,
        done: Sequence[DoneMarker],
        release: Sequence[Ident],
        token: str,
        done_ttl_s: int,
    ) -> None:
        """After the database commit only: set ``done`` markers for ``done_ttl_s``, then
        release the leases of ``release`` that still carry ``token`` (compare-and-delete)."""
        ...

    async def close(self) -> None:
        """Close the connection (if any)."""
        ...


def _parse(flat: Sequence[bytes | str]) -> list[LeaseResult]:
    out: list[LeaseResult] = []
    for i in range(0, len(flat), 2):
        head = flat[i]
        tag = head.decode() if isinstance(head, bytes) else str(head)
        if tag == "A":
            out.append(LeaseResult("acquired"))
        elif tag == "H":
            out.append(LeaseResult("held"))
        else:
            raw = flat[i + 1]
            marker = raw.decode() if isinstance(raw, bytes) else str(raw)
            status, _, digest = marker.partition(":")
            out.append(LeaseResult("done", status, digest))
    return out


class RedisLeases:
    """LeaseStore on a real Redis. Every call is a single round trip."""

    def __init__(
        self, url: str, *, epoch: str = "", socket_timeout_s: float = 2.0, client: Any = None
    ) -> None:
        self.epoch = epoch
        self.redis = client or aioredis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        self._acquire = self.redis.register_script(_ACQUIRE_LUA)
        self._finish = self.redis.register_script(_FINISH_LUA)
        self._renew = self.redis.register_script(_RENEW_LUA)

    async def acquire(self, idents: Sequence[Ident], token: str, ttl_ms: int) -> list[LeaseResult]:
        if not idents:
            return []
        keys: list[str] = []
        for ns, key in idents:
            keys += [done_key(ns, key, self.epoch), lease_key(ns, key)]
        flat = await self._acquire(keys=keys, args=[token, ttl_ms])
        return _parse(flat)

    async def renew(self, idents: Sequence[Ident], token: str, ttl_ms: int) -> int:
        if not idents:
            return 0
        n = await self._renew(keys=[lease_key(ns, k) for ns, k in idents], args=[token, ttl_ms])
        return int(n)

    async def finish(
        self,
        done: Sequence[DoneMarker],
        release: Sequence[Ident],
        token: str,
        done_ttl_s: int,
    ) -> None:
        if not done and not release:
            return
        keys = [done_key(d.namespace, d.key, self.epoch) for d in done]
        keys += [lease_key(ns, k) for ns, k in release]
        values = [f"{d.status}:{d.hash}" for d in done]
        await self._finish(keys=keys, args=[token, done_ttl_s, len(done), *values])

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()


class MemoryLeases:
    """LeaseStore in process memory: for the test harness, and the shape of a Redis that forgets.

    ``flush()`` forgets everything, as a Redis restart would.
    """

    def __init__(self) -> None:
        self.leases: dict[Ident, tuple[str, float]] = {}
        self.done: dict[Ident, tuple[str, str, float]] = {}

    def flush(self) -> None:
        self.leases.clear()
        self.done.clear()

    def expire_leases(self) -> None:
        self.leases.clear()

    async def acquire(self, idents: Sequence[Ident], token: str, ttl_ms: int) -> list[LeaseResult]:
        now = time.monotonic()
        out: list[LeaseResult] = []
        for ident in idents:
            d = self.done.get(ident)
            if d and d[2] > now:
                out.append(LeaseResult("done", d[0], d[1]))
                continue
            cur = self.leases.get(ident)
            if cur and cur[1] > now and cur[0] != token:
                out.append(LeaseResult("held"))
            else:
                self.leases[ident] = (token, now + ttl_ms / 1000)
                out.append(LeaseResult("acquired"))
        return out

    async def renew(self, idents: Sequence[Ident], token: str, ttl_ms: int) -> int:
        n = 0
        for ident in idents:
            cur = self.leases.get(ident)
            if cur and cur[0] == token:
                self.leases[ident] = (token, time.monotonic() + ttl_ms / 1000)
                n += 1
        return n

    async def finish(
        self,
        done: Sequence[DoneMarker],
        release: Sequence[Ident],
        token: str,
        done_ttl_s: int,
    ) -> None:
        expiry = time.monotonic() + done_ttl_s
        for d in done:
            self.done[(d.namespace, d.key)] = (d.status, d.hash, expiry)
        for ident in release:
            cur = self.leases.get(ident)
            if cur and cur[0] == token:
                del self.leases[ident]

    async def close(self) -> None:
        return None


class NoLeases:
    """LeaseStore used when Redis is switched off: grants everything, remembers nothing.

    Correctness then rests on the PostgreSQL inbox alone (the claim blocks a concurrent
    claimer until the first transaction ends).
    """

    async def acquire(self, idents: Sequence[Ident], token: str, ttl_ms: int) -> list[LeaseResult]:
        return [LeaseResult("acquired") for _ in idents]

    async def renew(self, idents: Sequence[Ident], token: str, ttl_ms: int) -> int:
        return len(idents)

    async def finish(
        self,
        done: Sequence[DoneMarker],
        release: Sequence[Ident],
        token: str,
        done_ttl_s: int,
    ) -> None:
        return None

    async def close(self) -> None:
        return None
