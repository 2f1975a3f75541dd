-- The catalog sample's tables (handlers/catalog/): one row per price change and per supplier
-- quote applied, with the rate the rates service gave and the amount in US dollars.
-- Deliberately no unique constraint on the keys: a double apply shows here (and fails the
-- sample's test) instead of being refused by the schema.
CREATE TABLE IF NOT EXISTS catalog_prices (
    id          bigserial      PRIMARY KEY,
    change_id   text           NOT NULL,
    sku         text           NOT NULL,
    amount      numeric(12, 2) NOT NULL,
    currency    text           NOT NULL,
    rate        numeric(12, 6) NOT NULL,
    usd         numeric(14, 2) NOT NULL,
    applied_at  timestamptz    NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS catalog_prices_change_id ON catalog_prices (change_id);

CREATE TABLE IF NOT EXISTS catalog_quotes (
    id          bigserial      PRIMARY KEY,
    quote_id    text           NOT NULL,
    supplier    text           NOT NULL,
    sku         text           NOT NULL,
    amount      numeric(12, 2) NOT NULL,
    currency    text           NOT NULL,
    rate        numeric(12, 6) NOT NULL,
    usd         numeric(14, 2) NOT NULL,
    applied_at  timestamptz    NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS catalog_quotes_quote_id ON catalog_quotes (quote_id);
