-- 0009 (SQLite): the compact decision log (tipgraph/store/packing.py).  A decision's
-- candidates, their features and the served policy's probabilities become one packed value
-- on the decision row; shadow runs keep their probabilities packed on their own row; the
-- served run is part of its decision.  candidates, tip_scores, the served policy_runs rows
-- and decisions.context_features (every joint vector holds the context) go.  Rewards keep
-- their copied features packed.  The data step converts every row in this transaction.
ALTER TABLE decisions ADD COLUMN n_candidates INTEGER NOT NULL DEFAULT 0;
ALTER TABLE decisions ADD COLUMN candidates BLOB;
-- The shown tip's text, where the history query reads it without unpacking anything.
ALTER TABLE decisions ADD COLUMN chosen_content TEXT;
ALTER TABLE decisions DROP COLUMN context_features;
ALTER TABLE policy_runs ADD COLUMN probabilities BLOB;
ALTER TABLE rewards ADD COLUMN packed_features BLOB;
-- @data compact_log
-- The scores first: deleting runs would cascade to them one row at a time.
DROP TABLE tip_scores;
DELETE FROM policy_runs WHERE role = 'served';
DROP TABLE candidates;
ALTER TABLE rewards DROP COLUMN features;
ALTER TABLE rewards RENAME COLUMN packed_features TO features;
