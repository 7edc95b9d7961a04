"""Feature-group importance: what each block of features is worth to the served policy.

For a linear policy, the off-policy value of its configuration as served, and of the same
configuration with each of its feature groups left out (``features`` without that group),
each evaluated progressively on the same log with the tuning config's estimator
(:func:`tuning.ope.progressive`: the policy learns the log in time order, as it would have
served it).  A group whose removal lowers the value carries signal; one whose removal
changes nothing (within the intervals) could be dropped.  Each value has its own 95%
interval; the intervals are not of the differences, which share every event and are
tighter than both.  Like Azure Personalizer's feature evaluation, but on the policy's own
learning curve.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from tipgraph.features import FEATURE_SPEC
from tipgraph.policies import make_policy
from tipgraph.settings import FeatureGroup, LinearModelSettings, PolicySettings
from tuning.config import EvaluationSettings
from tuning.logged import LoggedBandit
from tuning.ope import Estimate
from tuning.trials import progressive_value

ALL_GROUPS: tuple[FeatureGroup, ...] = typing.get_args(FeatureGroup)


@dataclass(frozen=True)
class GroupImportance:
    left_out: FeatureGroup | None
    """The group left out; None for the configuration as served."""
    estimate: Estimate
    change: float
    """Value minus the served configuration's: negative when the group carries signal."""


def feature_importance(
    policy: PolicySettings, log: LoggedBandit, evaluation: EvaluationSettings
) -> list[GroupImportance]:
    """The served configuration first, then one row per group it uses, left out.

    Empty for a policy without a linear model (uniform, baseline) and for a log on
    another feature layout than tipgraph's own (the groups name its columns).
    """
    if not isinstance(policy, LinearModelSettings) or log.dim != FEATURE_SPEC.dim:
        return []
    groups = policy.features or ALL_GROUPS

    def value(features: tuple[FeatureGroup, ...] | None) -> Estimate:
        variant = policy.model_copy(update={"features": features})
        learner = make_policy(variant, log.dim, spec_version=FEATURE_SPEC.version)
        return progressive_value(learner, log, evaluation)

    served = value(policy.features)
    rows = [GroupImportance(None, served, 0.0)]
    if len(groups) < 2:
        return rows
    for group in groups:
        kept = tuple(g for g in groups if g != group)
        estimate = value(kept)
        rows.append(GroupImportance(group, estimate, estimate.value - served.value))
    return rows
