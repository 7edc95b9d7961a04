-- 0004 (Postgres): erasing a user (DELETE /v1/users/{id}) deletes their decisions and
-- feedback but keeps what the policies learned. A reward keeps a copy of the features it
-- trained on, and its event_id becomes NULL when the decision goes, so a replica that
-- rebuilds from the rewards log still learns exactly what the others did.
ALTER TABLE rewards ADD COLUMN features JSONB;
ALTER TABLE rewards ALTER COLUMN event_id DROP NOT NULL;
ALTER TABLE rewards DROP CONSTRAINT rewards_event_id_fkey;
ALTER TABLE rewards ADD CONSTRAINT rewards_event_id_fkey
    FOREIGN KEY (event_id) REFERENCES decisions (event_id) ON DELETE SET NULL;
