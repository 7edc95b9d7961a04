"""``tipgraph report``: the store read behind it, its numbers, and the files it renders.

The numbers are checked on a simulated log whose truth is known (every estimate's interval
must cover its policy's true value); the files are rendered from a real decision log that
the in-process service wrote, with shadows (one always failing) and an LLM stub that
serves two prompt versions and fails every fifth call.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

import tipgraph.local
from tipgraph.contracts import TIP_KINDS
from tipgraph.features import FEATURE_SPEC
from tipgraph.generation import CandidateSource, Completion, LLMUnavailable
from tipgraph.generation.litellm_client import build_candidate_source
from tipgraph.settings import (
    EpsilonGreedySettings,
    GenerationSettings,
    StoreSettings,
    TipgraphSettings,
)
from tipgraph.simulator import START, run_local
from tipgraph.store import (
    CandidateRecord,
    DecisionRecord,
    DecisionStore,
    FeedbackRecord,
    LogFilter,
    LoggedEvent,
    LoggedPolicyRun,
    LoggedRuns,
    PolicyScoresRecord,
    open_store,
)
from tuning import report as report_cli
from tuning.config import EvaluationSettings
from tuning.importance import ALL_GROUPS
from tuning.report import (
    add_arguments,
    configured_policies,
    load_report,
    render_from_store,
    run_from_args,
)
from tuning.report_data import (
    NO_PROMPT,
    BucketSpec,
    Report,
    build_report,
    make_buckets,
    make_estimator,
)
from tuning.report_render import HEIGHT, PLOTS, WIDTH
from tuning.simulated_log import DECISION_SPACING, simulate_log, true_value

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILES = [plot.filename for plot in PLOTS] + ["report.html", "report.json"]
DECISIONS = 240
LLM_FAILS_EVERY = 5
SHADOWS = [
    {"policy": {"name": "egreedy", "kind": "egreedy"}},
    {"policy": {"name": "uniform", "kind": "uniform"}},
    {"policy": {"name": "broken", "kind": "uniform"}, "fault": {"fail": True}},
]


# -- the store read: every policy's run, aligned with logged_events ----------------------------

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
IDS = ["c0", "c1", "c2"]
SERVED_P = [0.2, 0.5, 0.3]


def policy_run(
    name: str, probabilities: list[float], chosen: int | None, *, error: str | None = None
) -> PolicyScoresRecord:
    return PolicyScoresRecord(
        policy_name=name,
        policy_version=f"{name}-v1",
        role="served" if name == "linucb" else "shadow",
        scores=[float(i) for i in range(len(probabilities))],
        probabilities=probabilities,
        chosen_candidate_id=None if chosen is None else IDS[chosen],
        chosen_probability=None if chosen is None else probabilities[chosen],
        latency_ms=1.0,
        error=error,
    )


def decision(
    event_id: str, at: datetime, *, prompt_version: str = "p1", source: str = "mixed"
) -> DecisionRecord:
    candidates = [
        CandidateRecord(
            candidate_id=IDS[i],
            position=i,
            kind=TIP_KINDS[i],
            source="llm",
            content=f"tip {i}",
            task_ref=None,
            model="stub",
            prompt_version=prompt_version,
            features=[float(i), 1.0],
        )
        for i in (2, 0, 1)  # not in position order: the store orders by position
    ]
    return DecisionRecord(
        event_id=event_id,
        user_key="user",
        created_at=at,
        policy_name="linucb",
        policy_version="linucb-v1",
        feature_version="f1",
        prompt_version=prompt_version,
        generation_source=source,
        chosen_candidate_id="c1",
        chosen_kind=TIP_KINDS[1],
        chosen_probability=SERVED_P[1],
        latency_ms={},
        candidates=candidates,
        served=policy_run("linucb", SERVED_P, 1),
    )


def feedback(event_id: str, reward: float) -> FeedbackRecord:
    return FeedbackRecord(event_id, "done", None, reward, T0, T0 + timedelta(seconds=1))


def test_logged_policy_runs_align_with_logged_events(store: DecisionStore) -> None:
    hour = timedelta(hours=1)
    store.write_decisions(
        [
            decision("e1", T0),
            decision("e2", T0 + hour, prompt_version="p2", source="fallback"),
            decision("silent", T0 + 2 * hour),  # no reward: not logged for evaluation
        ]
    )
    store.write_policy_scores(
        "e1",
        [
            policy_run("egreedy", [0.1, 0.1, 0.8], 2),
            policy_run("broken", [], None, error="InjectedFault: down"),
        ],
        IDS,
    )
    store.write_policy_scores("e2", [policy_run("egreedy", [0.6, 0.2, 0.2], 0)], IDS)
    store.write_policy_scores("orphan", [policy_run("egreedy", [0.6, 0.2, 0.2], 0)], IDS)
    for event_id, reward in (("e1", 1.0), ("e2", 0.25)):
        assert store.record_feedback(feedback(event_id, reward)).learned

    events = store.logged_events()
    runs = store.logged_policy_runs()
    assert [r.event_id for r in runs] == [e.event_id for e in events] == ["e1", "e2"]
    assert [r.generation_source for r in runs] == ["mixed", "fallback"]
    first = {run.policy_name: run for run in runs[0].runs}
    assert list(first) == ["broken", "egreedy", "linucb"]
    assert first["linucb"] == LoggedPolicyRun("linucb", "linucb-v1", "served", SERVED_P, 1, None)
    assert first["linucb"].probabilities == events[0].probabilities  # the same candidate order
    assert first["egreedy"] == LoggedPolicyRun(
        "egreedy", "egreedy-v1", "shadow", [0.1, 0.1, 0.8], 2, None
    )
    assert first["broken"] == LoggedPolicyRun(
        "broken", "broken-v1", "shadow", [], None, "InjectedFault: down"
    )
    assert [run.policy_name for run in runs[1].runs] == ["egreedy", "linucb"]

    for filters in (
        {"prompt_version": "p2"},
        {"policy_name": "nobody"},
        {"since": T0 + hour / 2},
        {"until": T0 + hour / 2},
        {"prompt_version": "p1", "policy_name": "linucb"},
    ):
        log_filter = LogFilter(**filters)  # type: ignore[arg-type]
        assert [r.event_id for r in store.logged_policy_runs(log_filter)] == [
            e.event_id for e in store.logged_events(log_filter)
        ], filters


# -- the numbers, on a simulated log with a known truth -----------------------------------------


@dataclass(frozen=True)
class Synthetic:
    events: list[LoggedEvent]
    runs: list[LoggedRuns]
    truth: dict[str, float]
    shadow_chose_first: float


@pytest.fixture(scope="module")
def synthetic() -> Synthetic:
    """A learning ε-greedy logger and four shadows whose true values are known:
    its identical twin, uniform, "first" (the generator's first candidate, ε = 0.3), and
    "flaky" (uniform, but failing on every fourth decision)."""
    logger = EpsilonGreedySettings(name="logger", epsilon=0.3)
    log, expected = simulate_log(logger, n_events=1200, seed=11)
    rng = np.random.default_rng(0)
    events, runs = [], []
    targets: dict[str, list[np.ndarray]] = {"logger": [], "uniform": [], "first": []}
    flaky_mask = np.zeros(log.n_events, dtype=bool)
    first_chosen = 0
    for i in range(log.n_events):
        X, mu, chosen, reward = log.event(i)
        k = len(mu)
        uniform = np.full(k, 1.0 / k)
        first = np.full(k, 0.3 / k)
        first[0] += 0.7
        targets["logger"].append(mu)
        targets["uniform"].append(uniform)
        targets["first"].append(first)
        event_id = str(log.event_id[i])
        events.append(
            LoggedEvent(
                event_id=event_id,
                created_at=START + i * DECISION_SPACING,
                policy_name="logger",
                prompt_version=("p1", "p2", None)[i % 3],
                features=X.tolist(),
                probabilities=mu.tolist(),
                chosen=chosen,
                reward=reward,
                reward_source="feedback",
                reward_id=i + 1,
                feature_version=FEATURE_SPEC.version,
            )
        )
        first_choice = int(rng.choice(k, p=first))
        first_chosen += first_choice == chosen
        flaky_mask[i] = i % 4 != 0
        flaky = (
            LoggedPolicyRun("flaky", "uniform-1.0", "shadow", uniform.tolist(), 0, None)
            if flaky_mask[i]
            else LoggedPolicyRun("flaky", "", "shadow", [], None, "TimeoutError: slow")
        )
        runs.append(
            LoggedRuns(
                event_id,
                "fallback" if i % 10 == 0 else "mixed",
                [
                    LoggedPolicyRun(
                        "first", "baseline-1.0", "shadow", first.tolist(), first_choice, None
                    ),
                    flaky,
                    LoggedPolicyRun(
                        "logger", f"egreedy-1.{i}", "served", mu.tolist(), chosen, None
                    ),
                    LoggedPolicyRun("twin", f"egreedy-2.{i}", "shadow", mu.tolist(), chosen, None),
                    LoggedPolicyRun(
                        "uniform",
                        "uniform-1.0",
                        "shadow",
                        uniform.tolist(),
                        int(rng.integers(k)),
                        None,
                    ),
                ],
            )
        )
    truth = {name: true_value(np.concatenate(pi), expected, log) for name, pi in targets.items()}
    rows = np.repeat(flaky_mask, log.n_candidates)
    truth["flaky"] = true_value(
        np.concatenate(targets["uniform"])[rows], expected[rows], log.subset(flaky_mask)
    )
    return Synthetic(events, runs, truth, first_chosen / log.n_events)


def synthetic_report(synthetic: Synthetic, **kwargs: Any) -> Report:
    return build_report(
        synthetic.events,
        synthetic.runs,
        estimator=make_estimator(EvaluationSettings()),
        expected={"ghost": "shadow"},
        **kwargs,
    )


@pytest.mark.parametrize("estimator", ["dr", "snips", "switch-dr", "dros", "sndr", "narrowest"])
def test_every_estimate_covers_its_policys_true_value(synthetic: Synthetic, estimator: str) -> None:
    report = build_report(
        synthetic.events,
        synthetic.runs,
        estimator=make_estimator(EvaluationSettings(estimator=estimator)),  # type: ignore[arg-type]
    )
    values = {p.name: p for p in report.policies}
    assert list(values) == ["logger", "first", "flaky", "twin", "uniform"]  # served first
    for name, truth in synthetic.truth.items():
        estimate = values[name].estimate
        assert estimate is not None and estimate.covers(truth), (name, estimate, truth)
    # The truths are far apart: an estimator that ignored the target could not cover them all.
    assert synthetic.truth["logger"] - synthetic.truth["uniform"] > 0.1
    uniform = values["uniform"].estimate
    assert uniform is not None and not uniform.covers(synthetic.truth["logger"])


def test_a_twin_of_the_served_policy_agrees_fully_and_gets_its_value(
    synthetic: Synthetic,
) -> None:
    report = synthetic_report(synthetic)
    values = {p.name: p for p in report.policies}
    logger, twin = values["logger"], values["twin"]
    assert twin.estimate == logger.estimate
    assert logger.role == "served" and twin.role == "shadow"
    assert logger.estimate is not None
    # On-policy, the estimate is the realised mean reward up to the reward model's noise.
    assert logger.estimate.value == pytest.approx(report.served_reward.value, abs=0.01)
    assert report.served_reward.value == pytest.approx(
        float(np.mean([e.reward for e in synthetic.events]))
    )
    agreement = {a.name: a for a in report.agreement}
    assert list(agreement) == ["first", "flaky", "ghost", "twin", "uniform"]
    assert (agreement["twin"].rate, agreement["twin"].n_events) == (1.0, 1200)
    assert agreement["first"].rate == pytest.approx(synthetic.shadow_chose_first)
    assert agreement["ghost"].rate is None


def test_failed_and_missing_shadows_are_estimated_on_what_they_logged(
    synthetic: Synthetic,
) -> None:
    values = {p.name: p for p in synthetic_report(synthetic).policies}
    flaky = values["flaky"]
    assert (flaky.n_runs, flaky.n_scored) == (1200, 900)
    assert flaky.estimate is not None and flaky.estimate.n_events == 900
    assert "900 of 1200" in flaky.note
    ghost = values["ghost"]  # configured, never answered
    assert ghost.estimate is None and ghost.note.startswith("no data")
    assert ghost.over_time == [None] * len(ghost.over_time)


def test_prompt_versions_fallbacks_and_buckets(synthetic: Synthetic) -> None:
    report = synthetic_report(synthetic, bucket=BucketSpec.parse("1d"))
    rewards = np.array([e.reward for e in synthetic.events])
    groups = {g.prompt_version: g for g in report.prompt_versions}
    assert list(groups) == [NO_PROMPT, "p1", "p2"]
    for offset, label in enumerate(["p1", "p2", NO_PROMPT]):
        assert groups[label].n_events == 400
        assert groups[label].reward.value == pytest.approx(rewards[offset::3].mean())
    assert (report.fallback.rate, report.fallback.n_fallback) == (0.1, 120)
    # 200 decisions a simulated day: six day buckets, starting at midnight UTC.
    buckets = report.buckets.buckets
    assert [b.n_events for b in buckets] == [200] * 6
    assert buckets[0].start == START and buckets[1].start == START + timedelta(days=1)
    logger = next(p for p in report.policies if p.name == "logger")
    for b, point in enumerate(logger.over_time):  # served: the realised mean per bucket
        assert point is not None and point.name == "realised"
        assert point.value == pytest.approx(rewards[b * 200 : (b + 1) * 200].mean())


@pytest.mark.parametrize(
    ("spec", "events", "width"),
    [("auto", None, None), ("500", 500, None), ("30m", None, 1800), ("1D", None, 86_400)],
)
def test_bucket_specs_parse(spec: str, events: int | None, width: int | None) -> None:
    parsed = BucketSpec.parse(spec)
    assert parsed.events == events
    assert parsed.width == (None if width is None else timedelta(seconds=width))


@pytest.mark.parametrize("spec", ["", "0", "-5", "1y", "1.5h", "h", "0d"])
def test_bad_bucket_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="bucket must be 'auto', a number of events"):
        BucketSpec.parse(spec)


def test_buckets_cover_every_event_once() -> None:
    times = [START + timedelta(seconds=s) for s in (0, 1, 1, 5, 99, 100)]
    auto = make_buckets(times, BucketSpec())  # 20 buckets of 5 s; empty ones dropped
    assert [b.n_events for b in auto.buckets] == [3, 1, 2]
    assert auto.index.tolist() == [0, 0, 0, 1, 2, 2]  # the last event closes the last bucket
    assert auto.buckets[2].start == START + timedelta(seconds=95)
    assert len(make_buckets(times, BucketSpec(events=4)).buckets) == 2
    same_time = make_buckets([START] * 3, BucketSpec())
    assert [b.n_events for b in same_time.buckets] == [3] and same_time.label.endswith("bucket)")


def test_an_empty_log_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="no logged decisions with rewards"):
        build_report([], [], estimator=make_estimator(EvaluationSettings()))
    config = tmp_path / "tipgraph.yaml"
    config.write_text(yaml.safe_dump({"store": {"url": f"sqlite:///{tmp_path}/empty.db"}}))
    code = report_cli.main(["--config", str(config), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("report: error: no logged decisions with rewards")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# -- the files, rendered from a log the service wrote ------------------------------------------


class FlakyLLM:
    """A tip of every kind per call; every LLM_FAILS_EVERY-th call fails (a fallback)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(
        self, alias: str, messages: list[dict[str, str]], timeout_s: float
    ) -> Completion:
        self.calls += 1
        if self.calls % LLM_FAILS_EVERY == 0:
            raise LLMUnavailable("the stub LLM is down")
        tips = [
            {"content": f"A {kind} tip, take {self.calls % 3}", "kind": kind} for kind in TIP_KINDS
        ]
        return Completion(json.dumps({"tips": tips}), "stub-model")


def service_settings(store: dict[str, Any]) -> TipgraphSettings:
    return TipgraphSettings(
        store=store,
        generation={
            "source": "mixed",
            "serve_from": "inline",  # each decision is its own prompt arm's call
            "prompts_dir": str(ROOT / "configs" / "prompts"),
            "prompts": [{"template": "tips_v1"}, {"template": "tips_v2"}],
            "breaker": {"failure_threshold": 1000},  # every failure is a fallback, no pause
        },
        shadows=SHADOWS,
    )


def simulate_with_llm(settings: TipgraphSettings, decisions: int) -> None:
    """The simulator against the in-process service, its LLM the stub."""
    stub = FlakyLLM()

    def generator(
        generation: GenerationSettings, store: Any, **wiring: Any
    ) -> tuple[CandidateSource, Any]:
        return build_candidate_source(generation, store, **{**wiring, "completer": stub})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tipgraph.local, "build_candidate_source", generator)
        blocks = run_local(settings, users=10, decisions=decisions, seed=5, block=decisions)
    assert all(block.errors == 0 for block in blocks)


@dataclass(frozen=True)
class Rendered:
    settings: TipgraphSettings
    report: Report
    out: Path
    written: list[Path]
    prompt_versions: list[str]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    root = tmp_path_factory.mktemp("report")
    settings = service_settings({"url": f"sqlite:///{root}/decisions.db"})
    simulate_with_llm(settings, DECISIONS)
    with open_store(settings.store) as store:
        versions = sorted({str(e.prompt_version) for e in store.logged_events()})
    report, written = render_from_store(
        settings.store,
        root / "out",
        expected=configured_policies(settings),
        served=settings.policy,  # as tipgraph report does
    )
    return Rendered(settings, report, root / "out", written, versions)


def test_every_file_is_written_under_its_stable_name(rendered: Rendered) -> None:
    assert [path.name for path in rendered.written] == FILES
    assert sorted(p.name for p in rendered.out.iterdir()) == sorted(FILES)
    assert all(path.stat().st_size > 0 for path in rendered.written)


@pytest.mark.parametrize("name", [plot.filename for plot in PLOTS])
def test_plots_are_pngs_of_the_fixed_size_and_not_blank(rendered: Rendered, name: str) -> None:
    data = (rendered.out / name).read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(BytesIO(data)) as image:
        image.load()
        assert image.format == "PNG" and image.size == (WIDTH, HEIGHT) == (1000, 600)
        pixels = np.asarray(image.convert("RGB")).astype(np.int64)
    assert pixels.std() > 0
    colours = np.unique(pixels[..., 0] << 16 | pixels[..., 1] << 8 | pixels[..., 2])
    assert len(colours) > 10  # lines, bands and text, not one fill


def test_the_page_is_self_contained_and_names_every_policy_and_prompt(
    rendered: Rendered,
) -> None:
    page = (rendered.out / "report.html").read_text(encoding="utf-8")
    for name in ("linucb", "egreedy", "uniform", "broken"):
        assert f"<td>{name}</td>" in page
    assert len(rendered.prompt_versions) == 2
    assert [v.split("-")[0] for v in rendered.prompt_versions] == ["tips_v1", "tips_v2"]
    for version in rendered.prompt_versions:
        assert f"<td>{version}</td>" in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(i) for i in images] == [
        (rendered.out / plot.filename).read_bytes() for plot in PLOTS
    ]
    # Nothing to fetch: no scripts, stylesheets or remote images.
    assert "<script" not in page and "<link" not in page and 'src="http' not in page
    assert "estimate (dr)" in page and "the snips estimate" in page  # which estimator


def test_report_json_numbers_are_sane(rendered: Rendered) -> None:
    numbers = json.loads((rendered.out / "report.json").read_text(encoding="utf-8"))
    assert numbers["n_events"] == DECISIONS and numbers["files"] == FILES
    policies = {p["name"]: p for p in numbers["policies"]}
    assert list(policies) == ["linucb", "broken", "egreedy", "uniform"]
    assert policies["linucb"]["role"] == "served"
    assert policies["linucb"]["n_scored"] == DECISIONS
    broken = policies["broken"]
    assert broken["estimate"] is None and "InjectedFault" in broken["note"]
    estimates = [p["estimate"] for p in policies.values()] + [
        point for p in policies.values() for point in p["over_time"]
    ]
    for estimate in filter(None, estimates):
        if estimate["lower"] is not None:
            assert estimate["lower"] <= estimate["value"] <= estimate["upper"]
    # Each policy's estimate says what the log supports; the served policy is evaluated on
    # its own propensities, so every weight is 1 and the ESS is every decision.
    served = policies["linucb"]["estimate"]["diagnostics"]
    assert served["effective_sample_size"] == pytest.approx(DECISIONS)
    assert served["max_weight"] == pytest.approx(1.0)
    uniform = policies["uniform"]["estimate"]["diagnostics"]
    assert 0 < uniform["effective_sample_size"] < DECISIONS and uniform["max_weight"] > 1
    assert "ESS " in (rendered.out / "report.html").read_text(encoding="utf-8")
    # The served configuration, then each feature group left out.
    importance = numbers["feature_importance"]
    assert importance[0]["left_out"] is None and importance[0]["change"] == 0
    assert [g["left_out"] for g in importance[1:]] == list(ALL_GROUPS)
    served_value = importance[0]["estimate"]["value"]
    for group in importance[1:]:
        assert group["change"] == pytest.approx(group["estimate"]["value"] - served_value)
    assert "Feature-group importance" in (rendered.out / "report.html").read_text(encoding="utf-8")
    for agreement in numbers["agreement"]:
        rates = [agreement["rate"], *agreement["over_time"]]
        assert all(0.0 <= r <= 1.0 for r in rates if r is not None)
    assert numbers["agreement"][0]["name"] == "broken" and numbers["agreement"][0]["rate"] is None
    fallback = numbers["fallback"]
    # One LLM call per decision, every fifth failed.
    assert fallback["n_fallback"] == DECISIONS // LLM_FAILS_EVERY
    assert fallback["rate"] == pytest.approx(1 / LLM_FAILS_EVERY)
    assert all(0.0 <= r <= 1.0 for r in fallback["over_time"])
    assert [g["prompt_version"] for g in numbers["prompt_versions"]] == rendered.prompt_versions
    assert sum(g["n_events"] for g in numbers["prompt_versions"]) == DECISIONS
    assert sum(b["n_events"] for b in numbers["buckets"]) == DECISIONS


def test_cli_entry_points_render_with_filters(
    rendered: Rendered, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tipgraph.yaml"
    config.write_text(
        yaml.safe_dump({"store": {"url": rendered.settings.store.url}, "shadows": SHADOWS})
    )
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    version = rendered.prompt_versions[1]
    out = tmp_path / "cli"
    args = parser.parse_args(
        [
            "--out",
            str(out),
            "--bucket",
            "50",
            "--prompt-version",
            version,
            "--since",
            "2000-01-01T00:00:00+00:00",
        ]
    )
    assert run_from_args(args, tipgraph_config=str(config)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == [f"wrote {out / name}" for name in FILES]
    assert lines[-1].startswith("report on ") and "linucb (served)" in lines[-1]
    numbers = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert numbers["filters"]["prompt_version"] == version
    assert [g["prompt_version"] for g in numbers["prompt_versions"]] == [version]
    assert numbers["bucket"] == "50 decisions"

    with pytest.raises(ValueError, match="--until must be an ISO 8601 timestamp"):
        run_from_args(
            parser.parse_args(["--out", str(out), "--until", "yesterday"]),
            tipgraph_config=str(config),
        )


@pytest.mark.postgres
def test_the_report_renders_from_postgres(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    settings = service_settings({"url": postgres_url, "pg_schema": pg_schema})
    simulate_with_llm(settings, 60)
    with open_store(settings.store) as store:
        report = load_report(
            store,
            log_filter=LogFilter(since=datetime(2000, 1, 1, tzinfo=UTC)),
            expected=configured_policies(settings),
        )
    assert report.n_events == 60
    assert [p.name for p in report.policies] == ["linucb", "broken", "egreedy", "uniform"]
    _, written = render_from_store(StoreSettings(url=postgres_url, pg_schema=pg_schema), tmp_path)
    assert [p.name for p in written] == FILES
