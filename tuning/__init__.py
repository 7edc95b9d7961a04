"""Offline policy tuning: logged data, off-policy evaluation, the Ray Tune sweep, the report.

Builds on the core (``tipgraph``) and never imports the serving shells (``deployments``).
"""

from tuning.logged import LoggedBandit, LogValidationError
from tuning.ope import (
    DM,
    DR,
    IPS,
    SNIPS,
    Estimate,
    Estimator,
    EstimatorError,
    Replay,
    progressive,
    target_distribution,
)
from tuning.simulated_log import simulate_log, true_value

__all__ = [
    "DM",
    "DR",
    "IPS",
    "SNIPS",
    "Estimate",
    "Estimator",
    "EstimatorError",
    "LogValidationError",
    "LoggedBandit",
    "Replay",
    "progressive",
    "simulate_log",
    "target_distribution",
    "true_value",
]
