-- 0001 (SQLite): the decision log, per-policy scores and feedback.
-- Timestamps are ISO-8601 UTC text with microseconds ("2024-05-01T12:00:00.000000+00:00"),
-- one fixed width so that text order is time order. JSON columns hold arrays of floats.

CREATE TABLE decisions (
    event_id              TEXT PRIMARY KEY,
    user_key              TEXT NOT NULL,
    created_at            TEXT NOT NULL,
    policy_name           TEXT NOT NULL,
    policy_version        TEXT NOT NULL,
    feature_version       TEXT NOT NULL,
    prompt_version        TEXT,
    generation_source     TEXT NOT NULL,
    chosen_candidate_id   TEXT NOT NULL,
    chosen_kind           TEXT NOT NULL,
    chosen_probability    REAL NOT NULL,
    latency_context_ms    REAL,
    latency_generation_ms REAL,
    latency_scoring_ms    REAL,
    latency_total_ms      REAL,
    context_features      TEXT NOT NULL
);

-- user_history: one user's decisions, newest first.
CREATE INDEX decisions_user_created_idx ON decisions (user_key, created_at);

CREATE TABLE candidates (
    event_id       TEXT NOT NULL REFERENCES decisions (event_id) ON DELETE CASCADE,
    candidate_id   TEXT NOT NULL,
    position       INTEGER NOT NULL,
    kind           TEXT NOT NULL,
    source         TEXT NOT NULL,
    content        TEXT NOT NULL,
    task_ref       TEXT,
    model          TEXT,
    prompt_version TEXT,
    features       TEXT NOT NULL,
    PRIMARY KEY (event_id, candidate_id)
);

-- No foreign key to decisions: a shadow's run may be written before the decision row.
CREATE TABLE policy_runs (
    event_id            TEXT NOT NULL,
    policy_name         TEXT NOT NULL,
    policy_version      TEXT NOT NULL,
    role                TEXT NOT NULL CHECK (role IN ('served', 'shadow')),
    chosen_candidate_id TEXT,
    chosen_probability  REAL,
    latency_ms          REAL NOT NULL,
    error               TEXT,
    created_at          TEXT NOT NULL,
    PRIMARY KEY (event_id, policy_name)
);

CREATE TABLE tip_scores (
    event_id     TEXT NOT NULL,
    policy_name  TEXT NOT NULL,
    candidate_id TEXT NOT NULL,
    score        REAL NOT NULL,
    probability  REAL NOT NULL,
    PRIMARY KEY (event_id, policy_name, candidate_id),
    FOREIGN KEY (event_id, policy_name)
        REFERENCES policy_runs (event_id, policy_name) ON DELETE CASCADE
);

-- AUTOINCREMENT: ids never reused, so feedback_id works as a training cursor.
CREATE TABLE feedback (
    feedback_id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT NOT NULL UNIQUE,
    reaction    TEXT NOT NULL CHECK (reaction IN ('done', 'snooze', 'dismiss')),
    value       REAL,
    reward      REAL NOT NULL,
    reacted_at  TEXT NOT NULL,
    received_at TEXT NOT NULL
);
