"""``tipgraph registry``: the registry's versions with their evidence and lineage, as text.

Plain functions of :class:`tipgraph.registry.VersionRecord`, so the same record feeds the text
here and ``--format json``.
"""

from __future__ import annotations

from collections.abc import Sequence

from tipgraph.registry import VersionRecord

NOT_RECORDED = "not recorded"


def gate_verdict(record: VersionRecord) -> str:
    verdict = record.passes_gate
    if verdict is None:
        return "no baseline recorded"
    return "passes" if verdict else "fails"


def gate_detail(record: VersionRecord) -> str:
    if record.evidence is None or record.baseline is None:
        return "no baseline recorded: only `tipgraph promote --force` can promote it"
    lower, value = record.evidence.lower, record.baseline.evidence.value
    if record.passes_gate:
        return f"passes: lower bound {lower:.4f} beats the baseline's estimate {value:.4f}"
    return f"fails: lower bound {lower:.4f} does not beat the baseline's estimate {value:.4f}"


def format_versions(model_name: str, records: Sequence[VersionRecord]) -> str:
    """One line per version, newest first."""
    if not records:
        return f"{model_name}: no versions registered yet (`tipgraph tune` registers one)"
    header = (
        f"{'version':>7}  {'aliases':<20} {'kind':<9} {'lower bound':>11}  "
        f"{'baseline':>8}  {'gate':<21} {'events':>7}  created"
    )
    count = f"{len(records)} version{'s' if len(records) != 1 else ''}"
    lines = [f"{model_name}: {count}", header]
    for r in records:
        aliases = ",".join(f"@{a}" for a in r.aliases) or "-"
        lower = f"{r.evidence.lower:.4f}" if r.evidence else "-"
        base = f"{r.baseline.evidence.value:.4f}" if r.baseline else "-"
        events = str(r.lineage.n_events) if r.lineage and r.lineage.n_events else "-"
        lines.append(
            f"{r.version:>7}  {aliases:<20} {r.kind:<9} {lower:>11}  {base:>8}  "
            f"{gate_verdict(r):<21} {events:>7}  {r.created_at}"
        )
    return "\n".join(lines)


def format_version(model_name: str, r: VersionRecord) -> str:
    """Everything about one version: what it is, why it was registered, what happened to it."""
    lines = [
        f"{model_name} version {r.version}"
        + (f" ({', '.join('@' + a for a in r.aliases)})" if r.aliases else ""),
        f"  created           {r.created_at}" + (f", MLflow run {r.run_id}" if r.run_id else ""),
        f"  kind              {r.kind}",
        f"  policy version    {r.policy_version}",
        f"  feature version   {r.feature_spec}",
        "  hyperparameters   "
        + (
            " ".join(f"{k}={v}" for k, v in r.hyperparameters.items() if k != "kind")
            or "(none: this kind has no hyperparameters)"
            if r.hyperparameters is not None
            else NOT_RECORDED
        ),
    ]
    if r.evidence is not None:
        lines.append(
            f"  evidence          {r.evidence.estimator}: {r.evidence.describe()} "
            f"on {r.evidence.n_events} events"
        )
    else:
        lines.append(f"  evidence          {NOT_RECORDED}")
    if r.baseline is not None:
        champion = (
            f"; champion then: {r.baseline.champion_version or 'none'}"
            if r.baseline.recorded_champion
            else ""
        )
        lines.append(
            f"  baseline          {r.baseline.name}: {r.baseline.evidence.describe()}{champion}"
        )
    else:
        lines.append(f"  baseline          {NOT_RECORDED}")
    lines.append(f"  promotion gate    {gate_detail(r)}")
    if r.lineage is not None:
        filters = ", ".join(f"{k}={v}" for k, v in r.lineage.filters.items()) or "none"
        lines += [
            f"  tuned on          {r.lineage.source}",
            f"    events          {r.lineage.n_events or NOT_RECORDED}",
            f"    filters         {filters}",
            f"    trained through reward id {r.lineage.trained_through_reward_id}",
        ]
        if r.lineage.sweep_run_id:
            lines.append(f"    sweep run       {r.lineage.sweep_run_id}")
    else:
        lines.append(f"  tuned on          {NOT_RECORDED}")
    lines.append("  promotion history" + ("" if r.history else "  none"))
    for event in r.history:
        other = f" (version {event.other_version})" if event.other_version else ""
        when = event.at or "(time not recorded)"
        who = f" by {event.by}" if event.by else ""
        lines.append(f"    {when}  {event.action}{other}{who}: {event.reason}")
    return "\n".join(lines)
