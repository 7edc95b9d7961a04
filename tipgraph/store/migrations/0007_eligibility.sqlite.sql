-- 0007: which eligibility rules removed candidates before scoring (tipgraph/eligibility.py),
-- as JSON {"rule": candidates removed}; NULL when none fired.
ALTER TABLE decisions ADD COLUMN eligibility TEXT;
