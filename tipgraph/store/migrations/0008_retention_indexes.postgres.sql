-- 0008: the retention's clean-up of rows without a decision filters on these times
-- (DecisionStore.delete_expired_leftovers): indexes, not full scans, every hour.
CREATE INDEX policy_runs_created_idx ON policy_runs (created_at);
CREATE INDEX feedback_received_idx ON feedback (received_at);
CREATE INDEX tip_embeddings_created_idx ON tip_embeddings (created_at);
