-- 0010 (Postgres): decisions partitioned by week of created_at (tipgraph/store/partitions.py),
-- so that retention drops a week at a time and time-bounded reads skip the other weeks.
-- A partitioned table's unique keys must hold its partition key: the primary key becomes
-- (event_id, created_at), and rewards can no longer reference decisions by a foreign key.
-- Erasure and retention clear a reward's event_id themselves, as ON DELETE SET NULL did.
ALTER TABLE rewards DROP CONSTRAINT rewards_event_id_fkey;
ALTER TABLE decisions RENAME TO decisions_unpartitioned;
ALTER TABLE decisions_unpartitioned RENAME CONSTRAINT decisions_pkey TO decisions_unpartitioned_pkey;
DROP INDEX decisions_created_idx;
DROP INDEX decisions_user_created_idx;
CREATE TABLE decisions (
    LIKE decisions_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    PRIMARY KEY (event_id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX decisions_created_idx ON decisions (created_at);
CREATE INDEX decisions_user_created_idx ON decisions (user_key, created_at);
CREATE TABLE decisions_default PARTITION OF decisions DEFAULT;
-- @data partition_decisions
DROP TABLE decisions_unpartitioned;
