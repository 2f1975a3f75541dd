-- The canonical-form version each inbox record's payload hash was made with
-- (consumer/dedup/hashing.py). Rows written before this migration were made with version 1,
-- the form of that time; a copy of their key is compared under version 1, so upgrading
-- never turns a re-sent old copy into a conflict.
ALTER TABLE dedup.inbox ADD COLUMN IF NOT EXISTS hash_version smallint NOT NULL DEFAULT 1;
