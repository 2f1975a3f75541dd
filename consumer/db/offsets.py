"""SQL for ``dedup.offsets``: the consumed position, committed with the side effects.

The database is the source of truth for positions; Kafka's committed offsets follow it for
lag tooling only.
"""

from __future__ import annotations

from collections.abc import Sequence

from consumer.types import Query


def lock(group: str, topic: str, partition: int) -> Query:
    # Takes the partition's row lock for the whole batch transaction and returns the stored
    # position (-1 if none). A zombie that still believes it owns the partition waits here
    # for the new owner's commit, then sees the advanced offset and skips what is done.
    return (
        """
        INSERT INTO dedup.offsets AS o (group_id, topic, partition, next_offset)
        VALUES ($1, $2, $3, -1)
        ON CONFLICT (group_id, topic, partition)
        DO UPDATE SET next_offset = o.next_offset
        RETURNING next_offset
        """,
        [group, topic, partition],
    )


def advance(group: str, topic: str, partition: int, next_offset: int) -> Query:
    # Only forward: a late commit can never move the position back.
    return (
        """
        UPDATE dedup.offsets SET next_offset = $4, updated_at = now()
        WHERE group_id = $1 AND topic = $2 AND partition = $3 AND next_offset < $4
        """,
        [group, topic, partition, next_offset],
    )


def stored(group: str, tps: Sequence[tuple[str, int]]) -> Query:
    return (
        """
        SELECT o.topic, o.partition, o.next_offset FROM dedup.offsets o
        JOIN unnest($2::text[], $3::int[]) AS t(topic, part)
          ON o.topic = t.topic AND o.partition = t.part
        WHERE o.group_id = $1 AND o.next_offset >= 0
        """,
        [group, [t for t, _ in tps], [p for _, p in tps]],
    )


def reset(group: str, topic: str, positions: dict[int, int]) -> Query:
    # The one statement that moves a position backwards (or forwards past records):
    # `consumer reset-positions`, an operator's deliberate decision.
    return (
        """
        INSERT INTO dedup.offsets AS o (group_id, topic, partition, next_offset)
        SELECT $1, $2, p, n FROM unnest($3::int[], $4::bigint[]) AS t(p, n)
        ON CONFLICT (group_id, topic, partition)
        DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()
        """,
        [group, topic, list(positions), list(positions.values())],
    )
