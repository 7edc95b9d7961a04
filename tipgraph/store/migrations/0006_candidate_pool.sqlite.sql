-- 0006: the candidate pool (LLM tips made ahead of need) and the embedding cache.
-- tip_pool: one entry per user, task-set fingerprint and prompt version. tips is NULL
-- until the first refill lands; claimed_at marks a refill in flight (any replica), so a
-- burst of misses causes one generation. serves counts the decisions the entry served.
CREATE TABLE tip_pool (
    user_key       TEXT NOT NULL,
    fingerprint    TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    tips           TEXT,
    model          TEXT,
    judge_version  TEXT,
    generated_at   TEXT,
    expires_at     TEXT,
    serves         INTEGER NOT NULL DEFAULT 0,
    claimed_at     TEXT,
    PRIMARY KEY (user_key, fingerprint, prompt_version)
);
CREATE INDEX tip_pool_generated_at ON tip_pool (generated_at);
CREATE INDEX tip_pool_expires_at ON tip_pool (expires_at);
-- Embeddings of a user's candidate tips, by the SHA-256 of the text (never the text):
-- per user, so an erasure takes them too. vector is the model's, projected the few
-- features the policies see (tipgraph/projection.py); model names both.
CREATE TABLE tip_embeddings (
    user_key   TEXT NOT NULL,
    text_hash  TEXT NOT NULL,
    model      TEXT NOT NULL,
    vector     TEXT NOT NULL,
    projected  TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (user_key, text_hash)
);
-- Where a decision's LLM candidates came from: 'hit' (the pool), 'miss' (none yet:
-- task tips served, a refill queued); NULL when the LLM was not asked (tasks, inline).
ALTER TABLE decisions ADD COLUMN llm_pool TEXT;
ALTER TABLE decisions ADD COLUMN llm_pool_age_s REAL;
