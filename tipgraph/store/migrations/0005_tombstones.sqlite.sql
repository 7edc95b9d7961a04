-- 0005 (SQLite): erasure that stays done, and feedback that waits durably.
-- erased_users: every write of a decision checks it in the same transaction, so a row
-- buffered in any replica (or replayed from a dead one's log) lands nowhere after its
-- user was erased. erased_events: the decisions erased (or dropped on arrival); their
-- shadow rows and feedback are refused. held_feedback: feedback that arrived before its
-- decision could be read, shared by every replica and kept across restarts.
CREATE TABLE erased_users (
    user_key  TEXT PRIMARY KEY,
    erased_at TEXT NOT NULL
);
CREATE TABLE erased_events (
    event_id  TEXT PRIMARY KEY,
    erased_at TEXT NOT NULL
);
CREATE TABLE held_feedback (
    event_id    TEXT PRIMARY KEY,
    reaction    TEXT NOT NULL CHECK (reaction IN ('done', 'snooze', 'dismiss')),
    value       REAL,
    reward      REAL NOT NULL,
    reacted_at  TEXT NOT NULL,
    received_at TEXT NOT NULL
);
CREATE INDEX held_feedback_received_at ON held_feedback (received_at);
-- Which HMAC key made a decision's user_key (privacy.user_key_id); NULL: before key ids.
ALTER TABLE decisions ADD COLUMN user_key_id TEXT;
