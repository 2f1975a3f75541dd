-- The chaos campaign's downstream service: one row per applied PaymentSettled.
-- Deliberately no unique constraint: a double-apply downstream must be visible here.
CREATE TABLE IF NOT EXISTS chaos_downstream_effects (
    id               bigserial   PRIMARY KEY,
    namespace        text        NOT NULL,
    idempotency_key  text        NOT NULL,
    payment_id       text        NOT NULL,
    account          text        NOT NULL,
    cents            bigint      NOT NULL,
    source           text        NOT NULL,
    applied_at       timestamptz NOT NULL DEFAULT now()
);
