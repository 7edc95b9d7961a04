-- 0001 (Postgres): the decision log, per-policy scores and feedback.
-- Unqualified names: the tables land in the first schema of search_path (store.pg_schema).

CREATE TABLE decisions (
    event_id              TEXT PRIMARY KEY,
    user_key              TEXT NOT NULL,
    created_at            TIMESTAMPTZ NOT NULL,
    policy_name           TEXT NOT NULL,
    policy_version        TEXT NOT NULL,
    feature_version       TEXT NOT NULL,
    prompt_version        TEXT,
    generation_source     TEXT NOT NULL,
    chosen_candidate_id   TEXT NOT NULL,
    chosen_kind           TEXT NOT NULL,
    chosen_probability    DOUBLE PRECISION NOT NULL,
    latency_context_ms    DOUBLE PRECISION,
    latency_generation_ms DOUBLE PRECISION,
    latency_scoring_ms    DOUBLE PRECISION,
    latency_total_ms      DOUBLE PRECISION,
    context_features      JSONB NOT NULL
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
    features       JSONB NOT NULL,
    PRIMARY KEY (event_id, candidate_id)
);

-- No foreign key to decisions: a shadow's run may be written before the decision row.
CREATE TABLE policy_runs (
    event_id            TEXT NOT NULL,
    policy_name         TEXT NOT NULL,
    policy_version      TEXT NOT NULL,
    role                TEXT NOT NULL CHECK (role IN ('served', 'shadow')),
    chosen_candidate_id TEXT,
    chosen_probability  DOUBLE PRECISION,
    latency_ms          DOUBLE PRECISION NOT NULL,
    error               TEXT,
    created_at          TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (event_id, policy_name)
);

CREATE TABLE tip_scores (
    event_id     TEXT NOT NULL,
    policy_name  TEXT NOT NULL,
    candidate_id TEXT NOT NULL,
    score        DOUBLE PRECISION NOT NULL,
    probability  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (event_id, policy_name, candidate_id),
    FOREIGN KEY (event_id, policy_name)
        REFERENCES policy_runs (event_id, policy_name) ON DELETE CASCADE
);

CREATE TABLE feedback (
    feedback_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    TEXT NOT NULL UNIQUE,
    reaction    TEXT NOT NULL CHECK (reaction IN ('done', 'snooze', 'dismiss')),
    value       DOUBLE PRECISION,
    reward      DOUBLE PRECISION NOT NULL,
    reacted_at  TIMESTAMPTZ NOT NULL,
    received_at TIMESTAMPTZ NOT NULL
);
