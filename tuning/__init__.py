"""Offline policy tuning (Ray Tune + off-policy evaluation + MLflow). Arrives with issue 5."""
