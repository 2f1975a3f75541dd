"""The SQL builders, read as strings: each returns (text, args) with one arg per placeholder."""

from __future__ import annotations

import re

import pytest

from consumer.constants import HASH_ALG, NOTIFY_CHANNEL, OUTBOX_SHARDS
from consumer.db import offsets
from consumer.dedup import inbox
from consumer.dedup.hashing import HASH_VERSION
from consumer.dedup.inbox import Claim, Completion
from consumer.outbox import store
from consumer.outbox.store import OutboxRow, shard_of

pytestmark = pytest.mark.unit


def _flat(text: str) -> str:
    return " ".join(text.split())


def _placeholders_match(query: tuple[str, list[object]]) -> None:
    text, args = query
    used = {int(n) for n in re.findall(r"\$(\d+)", text)}
    assert used == set(range(1, len(args) + 1)), (sorted(used), len(args))


CLAIMS = [
    Claim("ns", "b", "h2", "t", 1, 11),
    Claim("ns", "a", "h1", "t", 0, 10),
    Claim("m", "z", "h3", "t", 2, 12),
]


def test_claim_inserts_pending_rows_in_key_order_and_never_overwrites():
    text, args = q = inbox.claim(CLAIMS)
    _placeholders_match(q)
    flat = _flat(text)
    assert "INSERT INTO dedup.inbox" in flat
    assert "'pending'" in flat
    assert "ON CONFLICT (namespace, key) DO NOTHING" in flat
    assert "RETURNING namespace, key" in flat
    assert "ORDER BY t.ns, t.k" in flat
    # Sorted by (namespace, key) so overlapping batches lock keys in one order: no deadlock.
    assert args[0] == ["m", "ns", "ns"]
    assert args[1] == ["z", "a", "b"]
    assert args[2] == ["h3", "h1", "h2"]  # hashes travel with their keys
    assert args[3] == HASH_ALG
    assert args[4:7] == [["t", "t", "t"], [2, 0, 1], [12, 10, 11]]
    # Every record carries the canonical-form version its hash was made with.
    assert "hash_version" in flat and args[7] == HASH_VERSION == 2


def test_records_reads_by_namespace_and_key():
    text, args = q = inbox.records([("ns", "a"), ("m", "z")])
    _placeholders_match(q)
    assert "FROM dedup.inbox" in text
    assert "payload_hash" in text and "status" in text and "result" in text
    assert "hash_version" in text
    assert args == [["ns", "m"], ["a", "z"]]


def test_complete_touches_only_pending_rows():
    rows = [
        Completion("ns", "a", "done", '{"ok":1}', None),
        Completion("ns", "b", "rejected", None, "r"),
    ]
    text, args = q = inbox.complete(rows)
    _placeholders_match(q)
    flat = _flat(text)
    assert flat.startswith("UPDATE dedup.inbox")
    assert "i.status = 'pending'" in flat
    assert "t.result::jsonb" in flat
    assert args[:5] == [
        ["ns", "ns"],
        ["a", "b"],
        ["done", "rejected"],
        ['{"ok":1}', None],
        [None, "r"],
    ]
    # The reply content type chosen at completion (none given here: NULL, answered in msgpack).
    assert "reply_type = t.reply_type" in flat and args[5] == [None, None]


def test_unclaim_deletes_only_pending_rows():
    text, args = q = inbox.unclaim([("ns", "a")])
    _placeholders_match(q)
    flat = _flat(text)
    assert flat.startswith("DELETE FROM dedup.inbox")
    assert "i.status = 'pending'" in flat
    assert args == [["ns"], ["a"]]


def test_get_evict_expire():
    _placeholders_match(inbox.get("ns", "k"))
    text, args = q = inbox.evict("ns", "k")
    _placeholders_match(q)
    assert args == ["ns", "k"] and text.startswith("DELETE FROM dedup.inbox")
    text, args = q = inbox.expire(3600, 100)
    _placeholders_match(q)
    assert "first_seen_at < now()" in _flat(text) and "status <> 'pending'" in text
    assert "LIMIT $2" in text
    assert args == [3600.0, 100]


def test_offset_lock_upserts_without_moving_the_position():
    text, args = q = offsets.lock("g", "t", 3)
    _placeholders_match(q)
    flat = _flat(text)
    assert "ON CONFLICT (group_id, topic, partition)" in flat
    # The conflict branch must not change next_offset: it only takes the row lock.
    assert "DO UPDATE SET next_offset = o.next_offset" in flat
    assert "VALUES ($1, $2, $3, -1)" in flat
    assert "RETURNING next_offset" in flat
    assert args == ["g", "t", 3]


def test_offset_advance_only_moves_forward():
    text, args = q = offsets.advance("g", "t", 3, 42)
    _placeholders_match(q)
    flat = _flat(text)
    assert flat.startswith("UPDATE dedup.offsets SET next_offset = $4")
    assert "next_offset < $4" in flat
    assert args == ["g", "t", 3, 42]


def test_stored_offsets_skip_unset_positions():
    text, args = q = offsets.stored("g", [("t", 0), ("u", 2)])
    _placeholders_match(q)
    assert "o.next_offset >= 0" in _flat(text)
    assert args == ["g", ["t", "u"], [0, 2]]


ROWS = [
    OutboxRow("out", b"k1", b"v1", (("h", "1"),), "ns:k:0"),
    OutboxRow("out", None, b"v2", (), "ns:k:1"),
]


def test_outbox_insert_keeps_order_and_notifies():
    text, args = q = store.insert(ROWS)
    _placeholders_match(q)
    flat = _flat(text)
    assert "INSERT INTO dedup.outbox" in flat
    assert "WITH ORDINALITY" in flat and "ORDER BY t.n" in flat
    assert f"pg_notify('{NOTIFY_CHANNEL}', '')" in flat
    assert args[0] == ["out", "out"]
    assert args[1] == [b"k1", None]
    assert args[2] == [b"v1", b"v2"]
    assert args[3] == ['[["h", "1"]]', "[]"]
    assert args[4] == [shard_of("out", b"k1"), shard_of("out", None)]
    assert args[5] == ["ns:k:0", "ns:k:1"]


def test_shard_is_stable_and_in_range():
    assert shard_of("t", b"k") == shard_of("t", b"k")
    assert all(0 <= shard_of("t", str(i).encode()) < OUTBOX_SHARDS for i in range(500))
    assert len({shard_of("t", str(i).encode()) for i in range(500)}) > OUTBOX_SHARDS // 2
    assert ROWS[0].shard == shard_of("out", b"k1")


def test_relay_bookkeeping_queries():
    # The relay's shard-claiming queries belong to the relay's own tests; these are the
    # statements that decide what counts as published and what may be deleted.
    text, args = q = store.mark_published([3, 4])
    _placeholders_match(q)
    assert "SET published_at = now()" in text
    assert args == [[3, 4]]
    text, args = q = store.purge_published(60, 10)
    _placeholders_match(q)
    assert "published_at IS NOT NULL" in text
    assert args == [60.0, 10]
    _placeholders_match(store.backlog())


def test_the_batch_end_is_one_statement_with_every_part_numbered_apart():
    from consumer.db import flush
    from consumer.outbox.store import OutboxRow

    done = [Completion("ns", "a", "done", '{"n": 1}', None)]
    rows = [OutboxRow("t", b"k", b"v", (("h", "1"),), "ik")]
    assert flush.statement([], [], [], None) is None
    full = flush.statement(done, [("ns", "b")], rows, ("g", "t", 0, 7))
    assert full is not None
    _placeholders_match(full)
    text = _flat(full[0])
    for part in ("completed AS (", "unclaimed AS (", "written AS (", "advanced AS ("):
        assert part in text
    assert "pg_notify" in text and full[1][-1] == 7
    # Without outbox rows there is nothing to wake the relay for; parts left out entirely.
    only = flush.statement(done, [], [], ("g", "t", 0, 7))
    assert only is not None
    _placeholders_match(only)
    assert "pg_notify" not in only[0] and "written" not in only[0]
