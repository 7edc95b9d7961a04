-- 0011: a reaction carries what the user's history shows of its decision (the user, when
-- it was made, the kind and text of the tip shown), so that the history read the context
-- stage makes on every request is one index range on feedback, not a probe of every week
-- partition of decisions joined back to feedback.  Feedback without a decision (yet) keeps
-- them NULL and is in nobody's history, as before.
ALTER TABLE feedback ADD COLUMN user_key TEXT;
ALTER TABLE feedback ADD COLUMN decided_at TIMESTAMPTZ;
ALTER TABLE feedback ADD COLUMN chosen_kind TEXT;
ALTER TABLE feedback ADD COLUMN chosen_content TEXT;
UPDATE feedback AS f
SET user_key = d.user_key, decided_at = d.created_at, chosen_kind = d.chosen_kind,
    chosen_content = d.chosen_content
FROM decisions AS d
WHERE d.event_id = f.event_id;
CREATE INDEX feedback_user_decided_idx ON feedback (user_key, decided_at);
