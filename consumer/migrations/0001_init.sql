-- dedup-consumer schema, version 1.
-- Everything lives in schema "dedup" so it never collides with the application's tables.
CREATE SCHEMA IF NOT EXISTS dedup;

-- Inbox: one row per (namespace, idempotency key). The primary key is the fence:
-- two workers that both believe they own a key cannot both commit.
CREATE TABLE IF NOT EXISTS dedup.inbox (
    namespace      text        NOT NULL,
    key            text        NOT NULL,
    payload_hash   text        NOT NULL,
    hash_alg       text        NOT NULL,
    status         text        NOT NULL CHECK (status IN ('pending', 'done', 'rejected')),
    result         jsonb,
    reason         text,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    "offset"       bigint      NOT NULL,
    first_seen_at  timestamptz NOT NULL DEFAULT now(),
    completed_at   timestamptz,
    PRIMARY KEY (namespace, key)
);
CREATE INDEX IF NOT EXISTS inbox_completed_at ON dedup.inbox (completed_at);

-- Consumed positions, written in the same transaction as the side effects.
-- next_offset only moves forward (see consumer/runtime/offsets.py).
CREATE TABLE IF NOT EXISTS dedup.offsets (
    group_id     text        NOT NULL,
    topic        text        NOT NULL,
    partition    integer     NOT NULL,
    next_offset  bigint      NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- Outbox: every message a handler publishes, every dead letter, conflict and reply.
-- Rows are published by the relay in id order per (topic, key) shard.
CREATE TABLE IF NOT EXISTS dedup.outbox (
    id               bigserial   PRIMARY KEY,
    topic            text        NOT NULL,
    key              bytea,
    value            bytea       NOT NULL,
    headers          jsonb       NOT NULL DEFAULT '[]'::jsonb,
    shard            integer     NOT NULL,
    idempotency_key  text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    published_at     timestamptz
);
CREATE INDEX IF NOT EXISTS outbox_pending ON dedup.outbox (shard, id) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_published_at ON dedup.outbox (published_at) WHERE published_at IS NOT NULL;
