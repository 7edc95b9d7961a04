"""Guardrails on both stores, in tipgraph status, and a rollback against a real registry."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port
from tests.test_registry import evidence, trained
from tests.test_store import make_decision, make_feedback
from tipgraph.guardrails import evaluate_guardrails
from tipgraph.registry import CHAMPION, PolicyRegistry, RegistryError
from tipgraph.settings import ExperimentSettings, TipgraphSettings
from tipgraph.store import DecisionStore, open_store
from tipgraph.store.records import DecisionRecord
from tipgraph_ops.cli import EXIT_ERROR, EXIT_OK, main
from tipgraph_ops.status import decision_log_status

NOW = datetime.now(UTC)


def decided(event_id: str, policy: str, *, hours_ago: float = 1.0) -> DecisionRecord:
    decision = make_decision(event_id, created_at=NOW - timedelta(hours=hours_ago))
    return replace(
        decision, policy_name=policy, served=replace(decision.served, policy_name=policy)
    )


def log(store: DecisionStore, policy: str, reactions: list[str], **kwargs: float) -> None:
    prefix = f"{policy}-{kwargs.get('hours_ago', 1.0)}"
    decisions = [decided(f"{prefix}-{i}", policy, **kwargs) for i in range(len(reactions))]
    store.write_decisions(decisions)
    reward = {"done": 1.0, "snooze": 0.25, "dismiss": 0.0}
    for decision, reaction in zip(decisions, reactions, strict=True):
        store.record_feedback(
            make_feedback(decision.event_id, reaction, reward[reaction], at=decision.created_at)
        )


GUARDRAILS = ExperimentSettings(
    holdout_fraction=0.2,
    guardrails=[
        {"name": "dismissals", "metric": "dismiss_rate", "threshold": 0.5, "min_decisions": 50},
        {"name": "below_holdout", "metric": "lift", "threshold": -0.05, "min_decisions": 50},
    ],
)


def test_guardrails_are_crossed_only_with_confidence_over_their_window(
    store: DecisionStore,
) -> None:
    # The bandit: 80 answered in the window, 60 dismissed; the holdout: 60, mostly done.
    log(store, "linucb", ["dismiss"] * 60 + ["done"] * 20)
    log(store, "holdout_uniform", ["done"] * 50 + ["dismiss"] * 10)
    # Outside the 24-hour window: never counted.
    log(store, "linucb", ["done"] * 200, hours_ago=30)
    dismissals, below = evaluate_guardrails(store, GUARDRAILS, NOW)
    assert dismissals.value == pytest.approx(0.75)
    assert dismissals.bound == pytest.approx(0.75 - 1.959964 * math.sqrt(0.75 * 0.25 / 80))
    assert dismissals.crossed and "over 80 answered decisions" in dismissals.evidence
    assert below.value == pytest.approx(20 / 80 - 50 / 60)
    assert below.crossed and below.bound < -0.05
    # Too few decisions: not judged, never crossed.
    strict = GUARDRAILS.model_copy(
        update={
            "guardrails": [
                g.model_copy(update={"min_decisions": 500}) for g in GUARDRAILS.guardrails
            ]
        }
    )
    for result in evaluate_guardrails(store, strict, NOW):
        assert not result.crossed and math.isnan(result.value)
        assert result.evidence.startswith("not judged")


def test_a_healthy_bandit_crosses_nothing(store: DecisionStore) -> None:
    log(store, "linucb", ["done"] * 70 + ["dismiss"] * 10)
    log(store, "holdout_uniform", ["done"] * 20 + ["dismiss"] * 40)
    assert [r.crossed for r in evaluate_guardrails(store, GUARDRAILS, NOW)] == [False, False]


def test_guardrail_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="a lift guardrail needs a holdout"):
        ExperimentSettings(guardrails=[{"name": "x", "metric": "lift", "threshold": 0}])
    with pytest.raises(ValueError, match="guardrail names must be unique"):
        ExperimentSettings(
            guardrails=[
                {"name": "x", "metric": "dismiss_rate", "threshold": 0.5},
                {"name": "x", "metric": "dismiss_rate", "threshold": 0.6},
            ]
        )


def test_a_crossed_guardrail_fails_status_and_rolls_the_champion_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact folders
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = PolicyRegistry(tracking)
    registry.register(trained("linucb", 0), evidence(0.70))
    registry.promote(force=True, by="tester")
    first = registry.register(trained("linucb", 1), evidence(0.71))
    registry.client.set_registered_model_alias(registry.model_name, "challenger", first)
    registry.promote(force=True, by="tester")
    second = registry.register(trained("linucb", 2), evidence(0.72))
    registry.client.set_registered_model_alias(registry.model_name, "challenger", second)
    before = datetime.now(UTC)
    registry.promote(force=True, by="tester")
    promoted = datetime.now(UTC)
    assert registry.version_of(CHAMPION) == second
    champion = registry.champion_since()
    assert champion is not None and champion[0] == second and champion[1] is not None
    # The registry keeps the promotion time to the second.
    assert before.replace(microsecond=0) <= champion[1] <= promoted

    config = tmp_path / "tipgraph.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": {"url": f"sqlite:///{tmp_path / 'log.db'}"},
                "registry": {"tracking_uri": tracking, "check_interval_s": 1},
                "experiment": {
                    "guardrails": [
                        {
                            "name": "dismissals",
                            "metric": "dismiss_rate",
                            "threshold": 0.5,
                            "min_decisions": 50,
                            "rollback": True,
                        }
                    ]
                },
            }
        )
    )
    settings = TipgraphSettings(
        store={"url": f"sqlite:///{tmp_path / 'log.db'}"},
        experiment={
            "guardrails": [
                {
                    "name": "dismissals",
                    "metric": "dismiss_rate",
                    "threshold": 0.5,
                    "min_decisions": 50,
                }
            ]
        },
    )
    # The second champion's decisions: after it took over and its replicas swapped it in.
    after = (promoted + timedelta(seconds=1.5) - NOW) / timedelta(hours=1)
    with open_store(settings.store) as store:
        log(store, "linucb", ["dismiss"] * 60 + ["done"] * 20, hours_ago=-after)
    time.sleep(max(0.0, (promoted + timedelta(seconds=3) - datetime.now(UTC)).total_seconds()))

    # tipgraph status fails while it is crossed (its ingress probe fails too: none runs).
    section = decision_log_status(settings, f"http://127.0.0.1:{free_port()}", timeout_s=1)
    assert not section.ok and "guardrail dismissals crossed: dismiss rate 0.750" in str(
        section.error
    )

    assert main(["--config", str(config), "guardrails", "check"]) == EXIT_ERROR
    assert "guardrail dismissals: CROSSED" in capsys.readouterr().out
    assert registry.version_of(CHAMPION) == second  # no --rollback: nothing moves

    assert main(["--config", str(config), "guardrails", "check", "--rollback"]) == EXIT_ERROR
    out = capsys.readouterr().out
    assert f"tip-policy@champion: rolled back from version {second}" in out
    assert registry.version_of(CHAMPION) == first
    (event,) = [e for e in registry.describe(first).history if e.action == "rolled back to"]
    assert "guardrail dismissals: dismiss rate 0.750" in event.reason

    # The next scheduled check judges the restored champion on its own decisions (none
    # yet), so the bad model is rolled back once, not down the chain to the first version.
    assert main(["--config", str(config), "guardrails", "check", "--rollback"]) == EXIT_OK
    assert "guardrail dismissals: ok: not judged: 0 answered decisions since" in (
        capsys.readouterr().out
    )
    assert registry.version_of(CHAMPION) == first
    # A rollback of a version that is no longer the champion (promoted over meanwhile)
    # is refused rather than applied to its successor.
    with pytest.raises(RegistryError, match=f"not the judged version {second}"):
        registry.rollback(by="tester", expected=second)
    assert registry.version_of(CHAMPION) == first
    # Hand-written history: a naive time is UTC, an unreadable one is skipped.
    registry.client.set_model_version_tag(
        registry.model_name,
        first,
        "promotion_history",
        json.dumps(
            [
                {"at": "2026-12-01T10:00:00", "action": "promoted", "by": "x", "reason": "r"},
                {"at": "soon", "action": "rolled back to", "by": "x", "reason": "r"},
            ]
        ),
    )
    assert registry.champion_since() == (first, datetime(2026, 12, 1, 10, tzinfo=UTC))

    healthy = tmp_path / "none.yaml"
    healthy.write_text(yaml.safe_dump({"store": {"url": f"sqlite:///{tmp_path / 'log.db'}"}}))
    assert main(["--config", str(healthy), "guardrails", "check"]) == EXIT_OK
