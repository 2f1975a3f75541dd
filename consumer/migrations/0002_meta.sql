-- The database's epoch: a random id made once per database. Redis done markers carry it in
-- their key, so markers left over from another database (recreated, restored elsewhere)
-- are never mistaken for this database's records.
CREATE TABLE IF NOT EXISTS dedup.meta (
    name   text PRIMARY KEY,
    value  text NOT NULL
);
INSERT INTO dedup.meta (name, value)
VALUES ('epoch', substr(md5(random()::text || clock_timestamp()::text), 1, 12))
ON CONFLICT (name) DO NOTHING;
