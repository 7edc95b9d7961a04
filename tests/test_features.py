from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest

from tests.factories import NOW, local_service, task, tip_body
from tipgraph import simulated_tips
from tipgraph.contracts import RecentReaction, TipRequest
from tipgraph.features import (
    EARLIER_LAYOUTS,
    FEATURE_GROUPS,
    FEATURE_SPEC,
    PRIOR_REWARD,
    RECENCY_FEATURE,
    RECENCY_HALF_LIFE_H,
    CandidateView,
    FeatureSpec,
    LayoutUpgrade,
    UserContext,
    build_context,
    candidate_matrix,
    kind_recency,
    kind_stats,
    part_of_day,
    read_user_context,
    upgrade_for_dim,
    upgrade_from,
)
from tipgraph.policies import PolicyStateError, make_policy, policy_from_bytes
from tipgraph.projection import PROJECTION, Projection, cosine
from tipgraph.settings import LinUCBSettings, RewardSettings, StoreSettings, TipgraphSettings
from tipgraph.store import open_store
from tipgraph.store.records import ReactionHistoryItem

REWARDS = RewardSettings()


def context_for(**overrides: object) -> tuple[TipRequest, object]:
    request = TipRequest.model_validate(tip_body(**overrides))
    return request, build_context(request, [], REWARDS)


def test_spec_version_is_stable_and_tracks_names() -> None:
    assert FEATURE_SPEC.version == FEATURE_SPEC.version
    assert FEATURE_SPEC.version.startswith("v2-")
    assert len(FEATURE_SPEC.names) == FEATURE_SPEC.dim
    assert len(set(FEATURE_SPEC.names)) == FEATURE_SPEC.dim
    # The projection's seed and size are part of the layout's name.
    other = Projection(PROJECTION.dim, PROJECTION.seed + 1)
    renamed = FeatureSpec(
        FEATURE_SPEC.context,
        FEATURE_SPEC.kinds,
        tuple(n.replace(PROJECTION.version, other.version) for n in FEATURE_SPEC.candidate),
    )
    assert renamed.version != FEATURE_SPEC.version


def _quality_block(context: UserContext, view: CandidateView) -> dict[str, float]:
    row = candidate_matrix(context, [view])[0]
    names = FEATURE_SPEC.names
    start = names.index("judge_score")
    return dict(zip(names[start:], row[start:], strict=True))


def test_tips_without_judge_or_embedding_get_zeros_and_indicators() -> None:
    request = TipRequest.model_validate(tip_body())
    context = build_context(request, [], RewardSettings())
    block = _quality_block(context, CandidateView("focus", ("t1",)))
    assert block.pop("judge_missing") == 1.0 and block.pop("embedding_missing") == 1.0
    assert set(block.values()) == {0.0}


def test_judge_score_embedding_and_similarity_to_dismissed_tips() -> None:
    request = TipRequest.model_validate(tip_body())
    dismissed = (PROJECTION(simulated_tips.embed("Plan your day: pick the three things")),)
    context = build_context(request, [], RewardSettings(), dismissed=dismissed)
    close = PROJECTION(simulated_tips.embed("Plan your day: pick the three things first"))
    far = PROJECTION(simulated_tips.embed("Set a timer for 10 minutes"))
    near_block = _quality_block(context, CandidateView("plan_day", (), 0.7, close))
    far_block = _quality_block(context, CandidateView("focus", (), None, far))
    assert near_block["judge_score"] == 0.7 and near_block["judge_missing"] == 0.0
    assert near_block["embedding_missing"] == 0.0
    assert near_block["dismissed_similarity"] > 0.8 > far_block["dismissed_similarity"]
    embedding = [v for k, v in near_block.items() if k.startswith("embedding_") and k[10].isdigit()]
    assert embedding == pytest.approx(list(close))
    # A candidate with a malformed embedding is treated as one without.
    broken = _quality_block(context, CandidateView("focus", (), None, (1.0, 2.0)))
    assert broken["embedding_missing"] == 1.0 and broken["dismissed_similarity"] == 0.0


def test_projection_is_seeded_unit_length_and_keeps_neighbours_close() -> None:
    a = simulated_tips.embed("Block 25 minutes for the report now")
    b = simulated_tips.embed("Block 25 minutes for the slides now")
    c = simulated_tips.embed("Maybe think about it someday")
    pa, pb, pc = PROJECTION(a), PROJECTION(b), PROJECTION(c)
    assert pa == PROJECTION(a) and len(pa) == PROJECTION.dim
    assert sum(x * x for x in pa) == pytest.approx(1.0)
    assert cosine(pa, pb) > cosine(pa, pc)
    assert Projection(PROJECTION.dim, 1)(a) != pa
    with pytest.raises(ValueError, match="finite"):
        PROJECTION([float("nan"), 1.0])


@pytest.mark.parametrize(
    ("hour", "part"),
    [
        (5, "morning"),
        (11, "morning"),
        (12, "afternoon"),
        (17, "evening"),
        (22, "night"),
        (3, "night"),
    ],
)
def test_part_of_day(hour: int, part: str) -> None:
    assert part_of_day(hour) == part


def test_context_counts_overdue_due_today_and_priority() -> None:
    _, context = context_for()
    assert context.overdue == 1  # t5, two days ago
    assert context.due_today == 1  # t1, in three hours
    assert context.high_priority == 2  # t1 (4), t5 (3)
    assert context.vector[0] == 1.0
    assert context.vector[1] == 1.0  # morning
    assert context.tasks["t5"].overdue and not context.tasks["t5"].due_today
    assert context.tasks["t6"].age_days == pytest.approx(20.0)
    assert "Open tasks: 6" in context.prompt


def test_timezone_moves_the_local_hour() -> None:
    _, utc = context_for()
    _, tokyo = context_for(timezone="Asia/Tokyo")
    assert utc.local_hour == 9
    assert tokyo.local_hour == 18
    assert tokyo.vector[3] == 1.0  # evening in Tokyo


def test_date_only_due_today_is_not_overdue() -> None:
    midnight = datetime(2026, 3, 4, tzinfo=UTC).isoformat()
    _, context = context_for(tasks=[task("a", due=midnight)])
    assert context.tasks["a"].due_today and not context.tasks["a"].overdue


def test_kind_stats_smooth_towards_the_prior() -> None:
    history = [ReactionHistoryItem("focus", "done", 1.0, NOW)] * 8
    recent = [RecentReaction(kind="batch", reaction="dismiss")]
    stats = kind_stats(history, recent, REWARDS)
    assert stats["focus"].shown == 8
    assert stats["focus"].mean_reward == pytest.approx((8 + PRIOR_REWARD * 2) / 10)
    assert stats["batch"].mean_reward == pytest.approx(PRIOR_REWARD * 2 / 3)
    assert stats["plan_day"].mean_reward == pytest.approx(PRIOR_REWARD)


def test_candidate_matrix_places_context_in_the_kind_block() -> None:
    _, context = context_for()
    X = candidate_matrix(context, [CandidateView("focus", ("t1",)), CandidateView("plan_day", ())])
    n_ctx, n_kinds = len(context.vector), len(FEATURE_SPEC.kinds)
    assert X.shape == (2, FEATURE_SPEC.dim)
    focus, plan = FEATURE_SPEC.kinds.index("focus"), FEATURE_SPEC.kinds.index("plan_day")
    np.testing.assert_array_equal(X[0, focus : n_ctx * n_kinds : n_kinds], context.vector)
    # every other kind's block is zero for this candidate
    assert X[0, : n_ctx * n_kinds].sum() == pytest.approx(sum(context.vector))
    np.testing.assert_array_equal(X[1, plan : n_ctx * n_kinds : n_kinds], context.vector)
    tail = dict(zip(FEATURE_SPEC.candidate, X[0, n_ctx * n_kinds :], strict=True))
    assert tail["has_task"] == 1.0 and tail["task_priority"] == 1.0
    assert tail["task_due_today"] == 1.0 and tail["task_overdue"] == 0.0
    assert X[1, n_ctx * n_kinds + FEATURE_SPEC.candidate.index("has_task")] == 0.0
    assert np.isfinite(X).all()


def test_context_prompt_never_contains_task_text() -> None:
    request, context = context_for()
    for one in request.tasks:
        assert one.content not in context.prompt  # type: ignore[attr-defined]


# -- recency: how lately the user was shown each kind ----------------------------------------
H = 3600.0


def test_kind_recency_halves_every_half_life_from_the_latest_exposure() -> None:
    now = 1_780_000_000.0
    shown = [
        ("a", "focus", now - 24 * H),
        ("b", "focus", now - 72 * H),  # older exposure of the same kind: the latest counts
        ("c", "plan_day", now - 48 * H),
        ("d", "batch", now + 5.0),  # stamped after "now" by a skewed clock: just shown
    ]
    recency = dict(kind_recency(shown, now, lookback_h=168))
    assert RECENCY_HALF_LIFE_H == 24.0
    assert recency == {"focus": 0.5, "plan_day": 0.25, "batch": 1.0}
    assert kind_recency([], now, lookback_h=168) == ()
    # Its own lookback, whatever the eligibility rules read: plan_day is 48 h old.
    assert dict(kind_recency(shown, now, lookback_h=36)) == {"focus": 0.5, "batch": 1.0}
    assert kind_recency(shown, now, lookback_h=0) == (("batch", 1.0),)


def test_recency_fills_its_column_for_the_candidates_kind_and_0_for_kinds_not_shown() -> None:
    request = TipRequest.model_validate(tip_body())
    context = replace(build_context(request, [], REWARDS), recency=(("focus", 0.5),))
    X = candidate_matrix(context, [CandidateView("focus", ()), CandidateView("batch", ())])
    column = FEATURE_SPEC.names.index(RECENCY_FEATURE)
    assert X[:, column].tolist() == [0.5, 0.0]
    assert RECENCY_FEATURE in FEATURE_GROUPS["history"]


async def test_the_context_reads_recency_from_the_decision_log_with_the_rules_off(
    store_settings: StoreSettings,
) -> None:
    """On both stores: the kind served a moment ago is at ~1, other kinds absent, and the
    exposures themselves are not carried when no rule needs them."""
    settings = TipgraphSettings(store=store_settings.model_dump(), shadows=[])
    assert not settings.eligibility.enabled
    request = TipRequest(**tip_body(user_id="u"))
    with open_store(settings.store) as store:
        service = local_service(settings, store)
        answer = await service.tip(request)
        await service.log.flush()
        key = service.user_key("u")
        context = read_user_context(store, request, key, settings, None)
        off = settings.model_copy(
            update={"features": settings.features.model_copy(update={"recency_lookback_h": 0})}
        )
        unread = read_user_context(store, request, key, off, None)
        await service.close()
    recency = dict(context.recency)
    assert set(recency) == {answer.tip.kind}
    assert 0.99 < recency[answer.tip.kind] <= 1.0
    assert context.exposures == ()
    assert unread.recency == ()


# -- layout upgrades: learning carried over into a layout with more features ------------------
def test_the_earlier_layout_is_the_previous_release_and_differs_only_by_recency() -> None:
    (earlier,) = EARLIER_LAYOUTS
    assert earlier.version == "v2-18300a7283"  # the layout released before recency
    assert set(FEATURE_SPEC.names) - set(earlier.names) == {RECENCY_FEATURE}
    assert upgrade_from(earlier.version) is upgrade_for_dim(earlier.dim) is not None
    assert upgrade_from(FEATURE_SPEC.version) is None and upgrade_for_dim(7) is None


def test_an_upgraded_vector_keeps_every_named_value_and_adds_zeros() -> None:
    (earlier,) = EARLIER_LAYOUTS
    upgrade = LayoutUpgrade(earlier, FEATURE_SPEC)
    x = np.arange(1.0, earlier.dim + 1)
    moved = dict(zip(FEATURE_SPEC.names, upgrade.vector(x), strict=True))
    assert moved.pop(RECENCY_FEATURE) == 0.0
    assert moved == dict(zip(earlier.names, x, strict=True))
    with pytest.raises(ValueError, match="drops features"):
        LayoutUpgrade(FEATURE_SPEC, earlier)


@pytest.mark.parametrize("half_life_s", [None, 3600.0])
def test_a_saved_state_of_the_earlier_layout_loads_as_if_learned_on_upgraded_vectors(
    half_life_s: float | None,
) -> None:
    (earlier,) = EARLIER_LAYOUTS
    upgrade = upgrade_from(earlier.version)
    assert upgrade is not None
    settings = LinUCBSettings(name="served", half_life_s=half_life_s)
    old = make_policy(settings, earlier.dim, spec_version=earlier.version)
    new = make_policy(settings, FEATURE_SPEC.dim, spec_version=FEATURE_SPEC.version)
    rng = np.random.default_rng(8)
    for i in range(40):
        x, r = rng.normal(size=earlier.dim), float(rng.uniform())
        old.update(x, r, 1_780_000_000.0 + 60 * i)
        new.update(upgrade.vector(x), r, 1_780_000_000.0 + 60 * i)
    loaded = policy_from_bytes(old.to_bytes(), expected_spec_version=FEATURE_SPEC.version)
    assert (loaded.dim, loaded.spec_version) == (FEATURE_SPEC.dim, FEATURE_SPEC.version)
    np.testing.assert_allclose(loaded.stats_.gram_, new.stats_.gram_, rtol=1e-12)
    np.testing.assert_allclose(loaded.stats_.b_, new.stats_.b_, rtol=1e-12)
    X = rng.normal(size=(6, FEATURE_SPEC.dim))
    np.testing.assert_allclose(loaded.decide(X, "e").scores, new.decide(X, "e").scores, rtol=1e-9)
    # Learning goes on in the new layout, recency included.
    loaded.update(X[0], 1.0, 1_780_000_000.0 + 60 * 41)
    # A layout that does not carry over is still refused, naming both.
    with pytest.raises(PolicyStateError, match="v9-unknown"):
        stray = make_policy(settings, earlier.dim, spec_version="v9-unknown")
        policy_from_bytes(stray.to_bytes(), expected_spec_version=FEATURE_SPEC.version)


@pytest.mark.postgres
def test_an_unreachable_store_is_read_once_per_request_not_once_per_read(
    postgres_url: str, pg_schema: str
) -> None:
    """History, dismissed tips and exposures each wait out the store's timeout in an
    outage: after the history read fails, the context stage reads nothing more."""
    import psycopg

    from tests.tcp_proxy import TcpProxy

    info = psycopg.conninfo.conninfo_to_dict(postgres_url)
    proxy = TcpProxy((str(info.get("host", "127.0.0.1")), int(info.get("port", 5432))))
    url = f"postgresql://{info.get('user', 'postgres')}@127.0.0.1:{proxy.port}/{info['dbname']}"
    settings = TipgraphSettings(
        store={"url": url, "pg_schema": pg_schema, "pool_min_size": 0, "timeout_s": 1},
        eligibility={"tip_cooldown_h": 6},
    )
    calls: list[str] = []
    try:
        with open_store(settings.store) as store:
            for name in ("user_history", "recent_exposures", "cached_projections"):
                real = getattr(store, name)

                def spy(*args: object, _name: str = name, _real: object = real) -> object:
                    calls.append(_name)
                    return _real(*args)  # type: ignore[operator]

                setattr(store, name, spy)
            request = TipRequest.model_validate(tip_body())
            read_user_context(store, request, "k", settings, "embedder")
            assert calls == ["user_history", "recent_exposures"]  # reachable: both read
            calls.clear()
            proxy.cut()
            context = read_user_context(store, request, "k", settings, "embedder")
    finally:
        proxy.close()
    assert calls == ["user_history"]
    assert context.history_size == 0 and context.recency == () and context.exposures == ()
