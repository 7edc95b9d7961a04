"""Guardrails: metrics the bandit must not cross, judged on the recent decision log.

Each guardrail (``experiment.guardrails``) looks at the decisions of its last
``window_h`` hours (:meth:`DecisionStore.outcomes_since`), and is crossed only *with
confidence*, so a noisy hour does not roll a model back:

* ``dismiss_rate``: the share of the bandit's answered decisions that were dismissed;
  crossed when its 95% lower bound, p − z·√(p(1 − p)/n), is above ``threshold``.
* ``lift``: the bandit's realised mean reward minus the holdout's (Welch,
  :func:`tipgraph.holdout.welch_lift`); crossed when its 95% upper bound is below
  ``threshold`` (a negative margin: the bandit does worse than the holdout).

With fewer than ``min_decisions`` in a group a guardrail is not judged.  Each ingress
replica samples them into ``tipgraph_guardrail_crossed``; ``tipgraph status`` fails while
one is crossed; ``tipgraph guardrails check --rollback`` points the champion back at the
previous one for the crossed guardrails configured with ``rollback``, with the evidence in
the registry's promotion history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from tipgraph.holdout import HOLDOUT_PREFIX, Z_95, RewardStats, welch_lift
from tipgraph.settings import ExperimentSettings, GuardrailSettings
from tipgraph.store import DecisionStore, PolicyOutcomes


@dataclass(frozen=True)
class GuardrailResult:
    name: str
    metric: str
    value: float
    """The metric's estimate; NaN when not judged."""
    bound: float
    """The end of its 95% interval that is compared with the threshold."""
    threshold: float
    crossed: bool
    rollback: bool
    evidence: str
    """One line: what was measured, on how many decisions, against what."""


def evaluate_guardrails(
    store: DecisionStore,
    settings: ExperimentSettings,
    now: datetime,
    *,
    rollback_since: datetime | None = None,
) -> list[GuardrailResult]:
    """Every configured guardrail, judged on its window ending ``now``; one that rolls
    back is cut at ``rollback_since`` when given (the current champion's first decisions),
    so it judges the model it would roll back on that model's own decisions only."""
    results = []
    for guardrail in settings.guardrails:
        since = now - timedelta(hours=guardrail.window_h)
        window = f"in the last {guardrail.window_h:g} h"
        if guardrail.rollback and rollback_since is not None and rollback_since > since:
            since = rollback_since
            window = f"since {rollback_since.isoformat(timespec='seconds')}"
        results.append(_judge(guardrail, store.outcomes_since(since), window))
    return results


def _judge(
    guardrail: GuardrailSettings, outcomes: dict[str, PolicyOutcomes], window: str
) -> GuardrailResult:
    bandit = [o for name, o in outcomes.items() if not name.startswith(HOLDOUT_PREFIX)]
    held = [o for name, o in outcomes.items() if name.startswith(HOLDOUT_PREFIX)]
    if guardrail.metric == "dismiss_rate":
        answered = sum(o.answered for o in bandit)
        if answered < guardrail.min_decisions:
            return _not_judged(guardrail, f"{answered} answered decisions {window}")
        p = sum(o.dismissed for o in bandit) / answered
        lower = p - Z_95 * math.sqrt(p * (1 - p) / answered)
        return GuardrailResult(
            guardrail.name,
            guardrail.metric,
            p,
            lower,
            guardrail.threshold,
            lower > guardrail.threshold,
            guardrail.rollback,
            f"dismiss rate {p:.3f} (95% lower bound {lower:.3f}) over {answered} answered "
            f"decisions of the bandit {window}; threshold {guardrail.threshold:g}",
        )
    ours, theirs = _rewards(bandit), _rewards(held)
    if min(ours.n, theirs.n) < guardrail.min_decisions:
        return _not_judged(
            guardrail, f"{ours.n} bandit and {theirs.n} holdout rewarded decisions {window}"
        )
    diff, _, upper = welch_lift(ours, theirs)
    return GuardrailResult(
        guardrail.name,
        guardrail.metric,
        diff,
        upper,
        guardrail.threshold,
        upper < guardrail.threshold,
        guardrail.rollback,
        f"lift over the holdout {diff:+.4f} (95% upper bound {upper:+.4f}): bandit "
        f"{ours.mean:.4f} on {ours.n}, holdout {theirs.mean:.4f} on {theirs.n} decisions "
        f"{window}; threshold {guardrail.threshold:+g}",
    )


def _rewards(outcomes: list[PolicyOutcomes]) -> RewardStats:
    total = RewardStats()
    for o in outcomes:
        total += RewardStats(o.rewarded, o.reward_sum, o.reward_squares)
    return total


def _not_judged(guardrail: GuardrailSettings, seen: str) -> GuardrailResult:
    return GuardrailResult(
        guardrail.name,
        guardrail.metric,
        math.nan,
        math.nan,
        guardrail.threshold,
        False,
        guardrail.rollback,
        f"not judged: {seen}, fewer than min_decisions={guardrail.min_decisions}",
    )
