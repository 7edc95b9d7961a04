"""Eligibility: tips a user must not see now, removed before the policy scores.

Three declarative rules (``eligibility`` in configs/tipgraph.yaml), over the tips the user
was shown lately (their served decisions, read by the context stage):

* ``tip_cooldown``: the same tip (candidate id) again within ``tip_cooldown_h`` hours;
* ``kind_cooldown``: a tip of a kind shown within ``kind_cooldown_h[kind]`` hours;
* ``daily_cap``: a kind already shown ``daily_caps[kind]`` times in the last 24 hours.

A candidate is counted under the first rule that removes it.  If the rules would remove
every candidate, none is removed and ``none_eligible`` is counted instead: a tip is always
served.  The policy then sees only eligible candidates, so the logged propensities are
over what it could choose, as off-policy evaluation needs.  Like Amazon Personalize's
filters and Duolingo's "recovering" arms (Yancey & Settles 2020, KDD).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from tipgraph.candidates import Candidate
from tipgraph.settings import EligibilitySettings

Exposure = tuple[str, str, float]
"""(candidate id, kind, shown at in Unix seconds): one tip the user was shown."""
NONE_ELIGIBLE = "none_eligible"
HOUR_S = 3600.0


def eligible(
    candidates: Sequence[Candidate],
    exposures: Sequence[Exposure],
    settings: EligibilitySettings,
    now: float,
) -> tuple[list[Candidate], dict[str, int]]:
    """The candidates the rules allow, and how many each rule removed."""
    if not settings.enabled or not exposures:
        return list(candidates), {}
    last_tip: dict[str, float] = {}
    last_kind: dict[str, float] = {}
    today: Counter[str] = Counter()
    for candidate_id, kind, shown_at in exposures:
        last_tip[candidate_id] = max(last_tip.get(candidate_id, shown_at), shown_at)
        last_kind[kind] = max(last_kind.get(kind, shown_at), shown_at)
        if now - shown_at < 24 * HOUR_S:
            today[kind] += 1
    kept: list[Candidate] = []
    removed: Counter[str] = Counter()
    for candidate in candidates:
        rule = _rule_that_removes(candidate, last_tip, last_kind, today, settings, now)
        if rule is None:
            kept.append(candidate)
        else:
            removed[rule] += 1
    if not kept:
        return list(candidates), {NONE_ELIGIBLE: 1}
    return kept, dict(removed)


def _rule_that_removes(
    candidate: Candidate,
    last_tip: dict[str, float],
    last_kind: dict[str, float],
    today: Counter[str],
    settings: EligibilitySettings,
    now: float,
) -> str | None:
    cooldown = settings.tip_cooldown_h
    shown = last_tip.get(candidate.candidate_id)
    if cooldown is not None and shown is not None and now - shown < cooldown * HOUR_S:
        return "tip_cooldown"
    kind_cooldown = settings.kind_cooldown_h.get(candidate.kind)  # type: ignore[call-overload]
    shown = last_kind.get(candidate.kind)
    if kind_cooldown is not None and shown is not None and now - shown < kind_cooldown * HOUR_S:
        return "kind_cooldown"
    cap = settings.daily_caps.get(candidate.kind)  # type: ignore[call-overload]
    if cap is not None and today[candidate.kind] >= cap:
        return "daily_cap"
    return None
