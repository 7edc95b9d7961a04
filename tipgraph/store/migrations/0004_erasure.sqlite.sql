-- 0004 (SQLite): erasing a user (DELETE /v1/users/{id}) deletes their decisions and
-- feedback but keeps what the policies learned. A reward keeps a copy of the features it
-- trained on, and its event_id becomes NULL when the decision goes, so a replica that
-- rebuilds from the rewards log still learns exactly what the others did. SQLite cannot
-- change a foreign key in place: the table is rebuilt, ids (the watermark) unchanged.
CREATE TABLE rewards_new (
    reward_id  INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT UNIQUE REFERENCES decisions (event_id) ON DELETE SET NULL,
    reward     REAL NOT NULL,
    source     TEXT NOT NULL CHECK (source IN ('feedback', 'default')),
    created_at TEXT NOT NULL,
    features   TEXT
);
INSERT INTO rewards_new (reward_id, event_id, reward, source, created_at)
SELECT reward_id, event_id, reward, source, created_at FROM rewards ORDER BY reward_id;
DROP TABLE rewards;
ALTER TABLE rewards_new RENAME TO rewards;
