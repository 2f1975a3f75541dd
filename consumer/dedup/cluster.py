"""Leases and done markers on a Redis Cluster (``CONSUMER_REDIS_CLUSTER=true``).

Every key carries its namespace as a hash tag (``lease:{ns}:key``, ``done:{ns}:epoch:key``,
consumer/constants.py), so all keys of one namespace live in one slot, and a Lua call over
them runs on one node. A batch may hold several namespaces (handlers, tenants), so each call of
:class:`~consumer.dedup.leases.RedisLeases` is split here into one call per namespace, sent
concurrently: one round trip per namespace instead of one in all. The scripts and what they
mean are unchanged, and Redis stays an accelerator: a cluster that loses keys or a node costs
speed, never correctness (the PostgreSQL inbox decides).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from consumer.dedup.leases import DoneMarker, LeaseResult, RedisLeases
from consumer.types import Ident


def _groups(namespaces: Sequence[str]) -> dict[str, list[int]]:
    """Positions by namespace, in first-seen order."""
    out: dict[str, list[int]] = defaultdict(list)
    for i, ns in enumerate(namespaces):
        out[ns].append(i)
    return out


class ClusterLeases(RedisLeases):
    """RedisLeases whose calls never mix namespaces (slots) in one script."""

    def __init__(self, url: str, *, epoch: str = "", socket_timeout_s: float = 2.0) -> None:
        client = redis_client(url, True, socket_timeout_s)
        super().__init__(url, epoch=epoch, socket_timeout_s=socket_timeout_s, client=client)

    async def acquire(self, idents: Sequence[Ident], token: str, ttl_ms: int) -> list[LeaseResult]:
        groups = list(_groups([ns for ns, _ in idents]).values())
        parts = await asyncio.gather(
            *(
                super(ClusterLeases, self).acquire([idents[i] for i in g], token, ttl_ms)
                for g in groups
            )
        )
        out: list[LeaseResult] = [LeaseResult("held")] * len(idents)
        for g, results in zip(groups, parts, strict=True):
            for i, r in zip(g, results, strict=True):
                out[i] = r
        return out

    async def renew(self, idents: Sequence[Ident], token: str, ttl_ms: int) -> int:
        groups = _groups([ns for ns, _ in idents]).values()
        parts = await asyncio.gather(
            *(
                super(ClusterLeases, self).renew([idents[i] for i in g], token, ttl_ms)
                for g in groups
            )
        )
        return sum(parts)

    async def finish(
        self,
        done: Sequence[DoneMarker],
        release: Sequence[Ident],
        token: str,
        done_ttl_s: int,
    ) -> None:
        by_ns: dict[str, tuple[list[DoneMarker], list[Ident]]] = defaultdict(lambda: ([], []))
        for d in done:
            by_ns[d.namespace][0].append(d)
        for ident in release:
            by_ns[ident[0]][1].append(ident)
        await asyncio.gather(
            *(super(ClusterLeases, self).finish(d, r, token, done_ttl_s) for d, r in by_ns.values())
        )


def redis_client(url: str, cluster: bool, timeout_s: float = 2.0) -> Any:
    """A Redis client for ``url``: a cluster client when ``cluster``."""
    if cluster:
        return RedisCluster.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
    return aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def lease_store(url: str, cluster: bool, epoch: str) -> RedisLeases:
    """The worker's lease store: per-namespace calls on a cluster, one call otherwise."""
    return ClusterLeases(url, epoch=epoch) if cluster else RedisLeases(url, epoch=epoch)
