-- Why a row left the outbox without being published (consumer/outbox/relay.py): NULL for a
-- published row. A given-up row has published_at set too (it left the outbox then), so the
-- relay never reads it again and retention deletes it after outbox_retention_s.
ALTER TABLE dedup.outbox ADD COLUMN IF NOT EXISTS given_up text;
