-- The content type every reply to a record's key is encoded in, chosen when the record was
-- completed (the first copy's request content type, or the handler's reply_content_type),
-- so the reply to any later copy is byte-identical to the first whatever that copy's own
-- content type (consumer/runtime/replies.py). NULL: a record completed before this column,
-- whose replies were all msgpack, as they stay.
ALTER TABLE dedup.inbox ADD COLUMN IF NOT EXISTS reply_type text;
