-- The payments service's own tables.
CREATE TABLE IF NOT EXISTS accounts (
    account        text   PRIMARY KEY,
    balance_cents  bigint NOT NULL DEFAULT 0
);

-- One row per applied payment. Deliberately no unique constraint on payment_id:
-- a double-apply would be visible here instead of being hidden by the schema.
CREATE TABLE IF NOT EXISTS ledger (
    id          bigserial   PRIMARY KEY,
    payment_id  text        NOT NULL,
    account     text        NOT NULL,
    cents       bigint      NOT NULL,
    tenant      text        NOT NULL DEFAULT '',
    applied_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ledger_payment_id ON ledger (payment_id);

-- A stand-in for a card processor that honours idempotency keys, as real ones do:
-- the same key returns the same reference instead of charging twice.
CREATE TABLE IF NOT EXISTS gateway_charges (
    idempotency_key  text        PRIMARY KEY,
    account          text        NOT NULL,
    cents            bigint      NOT NULL,
    reference        text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
