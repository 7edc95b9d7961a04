-- 0012: the decision events' outbox (bus.decision_events). A decision's event is written in
-- the decision's own transaction and deleted once JetStream has acknowledged it, so a
-- stored decision is published at least once, whatever crashes in between. Only what the
-- event carries: no user id, no task text.
CREATE TABLE decision_outbox (
    seq            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id       TEXT NOT NULL UNIQUE,
    created_at     TIMESTAMPTZ NOT NULL,
    policy_name    TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    prompt_version TEXT,
    candidate_id   TEXT NOT NULL,
    probability    DOUBLE PRECISION NOT NULL
);
