-- The orders example's tables (handlers/orders/): the HTTP service's orders, and what the
-- ledger worker applied for each order.created.
CREATE TABLE IF NOT EXISTS orders (
    order_id    text        PRIMARY KEY,
    customer    text        NOT NULL,
    cents       bigint      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per applied order.created. Deliberately no unique constraint on order_id: a
-- double apply shows here (and fails the audit) instead of being refused by the schema.
CREATE TABLE IF NOT EXISTS shipments (
    id          bigserial   PRIMARY KEY,
    order_id    text        NOT NULL,
    customer    text        NOT NULL,
    cents       bigint      NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS shipments_order_id ON shipments (order_id);
