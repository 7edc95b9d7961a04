-- 0002 (SQLite): separate what users said (feedback) from what the policies learn from
-- (rewards). A reward comes from feedback that arrived within the wait, or is a default
-- for a decision nobody answered in time; at most one per decision, whichever came first.

-- Whether this feedback produced the event's reward (late feedback, feedback without a
-- decision and feedback after a default reward are kept but not learned).
ALTER TABLE feedback ADD COLUMN learned INTEGER NOT NULL DEFAULT 1 CHECK (learned IN (0, 1));

-- AUTOINCREMENT: ids never reused and, with one writer at a time (BEGIN IMMEDIATE),
-- committed in increasing order, so reward_id works as a training watermark.
CREATE TABLE rewards (
    reward_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT NOT NULL UNIQUE REFERENCES decisions (event_id) ON DELETE CASCADE,
    reward     REAL NOT NULL,
    source     TEXT NOT NULL CHECK (source IN ('feedback', 'default')),
    created_at TEXT NOT NULL
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

UPDATE feedback SET learned = 0
WHERE NOT EXISTS (SELECT 1 FROM rewards AS r WHERE r.event_id = feedback.event_id);
