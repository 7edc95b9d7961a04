-- 0003: how the candidates of a decision were generated. generation_source says llm, tasks,
-- mixed or fallback; generation_reason says why a fallback happened (NULL otherwise);
-- llm_model is the model behind the tip-generator alias that answered.
ALTER TABLE decisions ADD COLUMN generation_reason TEXT;
ALTER TABLE decisions ADD COLUMN llm_model TEXT;
