-- 0002 (Postgres): separate what users said (feedback) from what the policies learn from
-- (rewards). A reward comes from feedback that arrived within the wait, or is a default
-- for a decision nobody answered in time; at most one per decision, whichever came first.

-- Whether this feedback produced the event's reward (late feedback, feedback without a
-- decision and feedback after a default reward are kept but not learned).
ALTER TABLE feedback ADD COLUMN learned BOOLEAN NOT NULL DEFAULT TRUE;

-- reward_id is a training watermark. Identity values are handed out at INSERT, not at
-- COMMIT, so the store serialises every transaction that inserts here behind one
-- advisory lock (see tipgraph.store.postgres). That only orders commits if each value is
-- drawn inside the lock: keep the sequence's CACHE at 1 (a session-cached block of ids
-- would be used out of order).
CREATE TABLE rewards (
    reward_id  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id   TEXT NOT NULL UNIQUE REFERENCES decisions (event_id) ON DELETE CASCADE,
    reward     DOUBLE PRECISION NOT NULL,
    source     TEXT NOT NULL CHECK (source IN ('feedback', 'default')),
    created_at TIMESTAMPTZ NOT NULL
);

-- apply_default_rewards: the oldest decisions first.
CREATE INDEX decisions_created_idx ON decisions (created_at);

-- Until now every feedback row was a training event; keep their order. Feedback whose
-- decision was never logged could not train before and cannot reference one now.
INSERT INTO rewards (event_id, reward, source, created_at)
SELECT f.event_id, f.reward, 'feedback', f.received_at
FROM feedback AS f
WHERE EXISTS (SELECT 1 FROM decisions AS d WHERE d.event_id = f.event_id)
ORDER BY f.feedback_id;

UPDATE feedback SET learned = FALSE
WHERE NOT EXISTS (SELECT 1 FROM rewards AS r WHERE r.event_id = feedback.event_id);
