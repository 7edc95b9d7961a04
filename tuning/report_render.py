"""A :class:`~tuning.report_data.Report` as PNG plots, one self-contained HTML page, and JSON.

Matplotlib draws on its Agg canvas directly (no pyplot, so no global state and no GUI
backend).  Every plot is :data:`WIDTH` × :data:`HEIGHT` pixels: the layout engine fits
labels inside the figure instead of growing it.  The HTML page embeds the very PNG bytes
written next to it, as data URIs, and needs nothing else to display.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuning.ope import Estimate
from tuning.report_data import BUCKET_ESTIMATOR, NO_PROMPT, Bucket, Report, finite

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

WIDTH, HEIGHT, DPI = 1000, 600, 100
HTML_FILE = "report.html"
JSON_FILE = "report.json"
SERVED_COLOUR = "#1f77b4"
SHADOW_COLOURS = ("#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


@dataclass(frozen=True)
class Plot:
    """One PNG of the report: its file, its heading, and what it means."""

    filename: str
    title: str
    draw: Callable[[Figure, Report], None]
    caption: Callable[[Report], str]


# -- helpers ----------------------------------------------------------------------------------


def _colours(report: Report) -> dict[str, str]:
    """One colour per policy, the same in every plot: served blue, shadows in turn."""
    colours: dict[str, str] = {}
    for policy in report.policies:
        if "served" in policy.role:
            colours[policy.name] = SERVED_COLOUR
        else:
            colours[policy.name] = SHADOW_COLOURS[len(colours) % len(SHADOW_COLOURS)]
    return colours


def _interval(estimate: Estimate | None) -> str:
    if estimate is None:
        return "no data"
    lower, upper = finite(estimate.lower), finite(estimate.upper)
    if lower is None or upper is None:
        return f"{estimate.value:.3f} (interval needs ≥ 2 decisions)"
    return f"{estimate.value:.3f} [{lower:.3f}, {upper:.3f}]"


def _no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=13)
    ax.set_xticks([])
    ax.set_yticks([])


def _time_axis(ax: Axes) -> None:
    import matplotlib.dates as mdates  # heavy: only a process that plots loads Matplotlib

    locator = mdates.AutoDateLocator(tz=UTC)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC))
    ax.set_xlabel("time (UTC), middle of each bucket")


def _dates(times: Sequence[datetime]) -> Any:
    """Matplotlib's date numbers, which its date locators and formatters read."""
    import matplotlib.dates as mdates  # heavy: only a process that plots loads Matplotlib

    return mdates.date2num(list(times))


def _series(
    ax: Axes, buckets: Sequence[Bucket], points: Sequence[Estimate | None], **style: Any
) -> None:
    """A line through the buckets that have a point, with its 95% band where finite."""
    kept = [(b.middle, p) for b, p in zip(buckets, points, strict=True) if p is not None]
    if not kept:
        return
    ax.plot(_dates([x for x, _ in kept]), [p.value for _, p in kept], marker="o", ms=3, **style)
    band = [(x, p) for x, p in kept if finite(p.lower) is not None and finite(p.upper) is not None]
    if band:
        ax.fill_between(
            _dates([x for x, _ in band]),
            [p.lower for _, p in band],
            [p.upper for _, p in band],
            color=style.get("color"),
            alpha=0.15,
            linewidth=0,
        )


# -- the five plots ---------------------------------------------------------------------------


def _draw_ope_value(fig: Figure, report: Report) -> None:
    ax = fig.add_subplot()
    policies = report.policies
    colours = _colours(report)
    ys = list(range(len(policies)))[::-1]  # served first, at the top
    estimates = [p.estimate for p in policies if p.estimate is not None]
    ends = [e.value for e in estimates] + [
        end for e in estimates for end in (finite(e.lower), finite(e.upper)) if end is not None
    ]
    low, high = min(ends, default=0.0), max(ends, default=1.0)
    pad = 0.1 * max(high - low, 0.05)
    left, right = low - pad, high + pad
    for y, policy in zip(ys, policies, strict=True):
        estimate = policy.estimate
        if estimate is None:
            ax.text(left + pad / 2, y, _shorten(policy.note, 110), va="center", fontsize=9)
            continue
        lower, upper = finite(estimate.lower), finite(estimate.upper)
        # An interval without a finite end (a single decision) is drawn to the axis edge.
        ax.errorbar(
            [estimate.value],
            [y],
            xerr=[
                [estimate.value - (left if lower is None else lower)],
                [(right if upper is None else upper) - estimate.value],
            ],
            fmt="o",
            color=colours[policy.name],
            capsize=6,
            ms=8,
        )
        ax.text(
            estimate.value,
            y + 0.12,
            f"{_interval(estimate)}, n = {estimate.n_events}",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.axvline(
        report.served_reward.value,
        color="grey",
        linestyle="--",
        linewidth=1,
        label=f"realised mean reward {report.served_reward.value:.3f}",
    )
    ax.set_xlim(left, right)
    ax.set_ylim(-0.6, len(policies) - 0.4)
    ax.set_yticks(ys, [f"{p.name}\n({p.role})" for p in policies])
    ax.set_xlabel(f"estimated mean reward per decision ({report.estimator}, 95% interval)")
    ax.set_title(f"Estimated value per policy on {report.n_events} decisions")
    ax.legend(loc="lower right", fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _caption_ope_value(report: Report) -> str:
    return (
        f"Off-policy estimate ({report.estimator}) of each policy's mean reward per decision, "
        "had it chosen every logged decision, with its 95% interval. The served policy is "
        "evaluated on its own logged probabilities, so its estimate is close to the realised "
        "mean reward (dashed line). A shadow is evaluated only on the decisions where it "
        "logged a distribution; decisions where it failed or was shed are left out (see the "
        "note in the table). A shadow whose interval lies above the served policy's is "
        "likely better; overlapping intervals mean the log cannot tell them apart yet."
    )


def _draw_reward_over_time(fig: Figure, report: Report) -> None:
    ax = fig.add_subplot()
    buckets = report.buckets.buckets
    colours = _colours(report)
    for policy in report.policies:
        kinds = sorted({p.name for p in policy.over_time if p is not None})
        if not kinds:
            continue
        _series(
            ax,
            buckets,
            policy.over_time,
            color=colours[policy.name],
            label=f"{policy.name} ({policy.role}, {' / '.join(kinds)})",
        )
    _time_axis(ax)
    ax.set_ylabel("mean reward per decision")
    ax.set_title(f"Reward over time (buckets: {report.buckets.label})")
    ax.legend(loc="best", fontsize=9)
    ax.grid(alpha=0.3)


def _caption_reward_over_time(report: Report) -> str:
    return (
        f"Mean reward per decision per time bucket ({report.buckets.label}). The served "
        "policy's line is the realised mean reward of the decisions it served. Each shadow's "
        f"is the {BUCKET_ESTIMATOR.name} estimate on that bucket's decisions (self-normalised "
        "importance weighting: a weighted mean of observed rewards, which stays in their "
        f"range on few decisions, unlike the {report.estimator} of the first plot), so it is "
        "noisier and slightly biased on small buckets. Shaded: 95% intervals (none for a "
        "bucket with a single decision). A rising served line means the policy is learning; "
        "a shadow persistently above it is worth a closer look."
    )


def _draw_shadow_agreement(fig: Figure, report: Report) -> None:
    if not report.agreement:
        _no_data(fig.add_subplot(), "no shadow policies in this window")
        return
    overall, over_time = fig.subplots(1, 2, width_ratios=[1, 2])
    names = [a.name for a in report.agreement]
    colours = [_colours(report)[name] for name in names]
    rates = [a.rate if a.rate is not None else 0.0 for a in report.agreement]
    bars = overall.barh(names[::-1], rates[::-1], color=colours[::-1])
    for bar, agreement in zip(bars, report.agreement[::-1], strict=True):
        text = (
            "no data" if agreement.rate is None else f"{agreement.rate:.0%} of {agreement.n_events}"
        )
        overall.text(0.02, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=9)
    overall.set_xlim(0, 1)
    overall.set_xlabel("share of decisions: shadow's choice = served choice")
    overall.set_title("Overall")
    buckets = report.buckets.buckets
    for colour, agreement in zip(colours, report.agreement, strict=True):
        kept = [
            (b.middle, r)
            for b, r in zip(buckets, agreement.over_time, strict=True)
            if r is not None
        ]
        if kept:
            over_time.plot(
                _dates([x for x, _ in kept]),
                [r for _, r in kept],
                marker="o",
                ms=3,
                color=colour,
                label=agreement.name,
            )
    over_time.set_ylim(-0.02, 1.02)
    over_time.set_title(f"Over time (buckets: {report.buckets.label})")
    over_time.legend(loc="best", fontsize=9)
    over_time.grid(alpha=0.3)
    _time_axis(over_time)
    fig.suptitle("Shadow agreement with the served policy")


def _caption_shadow_agreement(report: Report) -> str:
    return (
        "How often each shadow picked the candidate that was actually served, over the "
        "decisions where the shadow answered. Both draw from their own distributions, so "
        "two identical policies agree fully only when they are deterministic; low agreement "
        "means the shadow would change what users see, and its estimate then rests on fewer, "
        "more heavily weighted decisions (a wider interval)."
    )


def _draw_value_by_prompt_version(fig: Figure, report: Report) -> None:
    ax = fig.add_subplot()
    groups = report.prompt_versions
    xs = list(range(len(groups)))
    for x, group in zip(xs, groups, strict=True):
        reward = group.reward
        lower, upper = finite(reward.lower), finite(reward.upper)
        ax.bar([x], [reward.value], color=SERVED_COLOUR, alpha=0.6, width=0.6)
        if lower is not None and upper is not None:
            ax.errorbar(
                [x],
                [reward.value],
                yerr=[[reward.value - lower], [upper - reward.value]],
                fmt="none",
                ecolor="black",
                capsize=8,
            )
        ax.text(
            x,
            (upper if upper is not None else reward.value) + 0.01,
            f"{reward.value:.3f}\nn={group.n_events}, fallback {group.fallback_rate:.0%}",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_xticks(xs, [g.prompt_version for g in groups], rotation=15 if len(groups) > 3 else 0)
    ax.set_xlabel("prompt version")
    ax.set_ylabel("realised mean reward per decision (95% interval)")
    ax.set_title("Value per prompt version")
    ax.margins(y=0.2)
    ax.grid(axis="y", alpha=0.3)


def _caption_value_by_prompt_version(report: Report) -> str:
    return (
        "Realised mean reward of the decisions made with each prompt version, with its 95% "
        "interval and count. The prompt split assigns versions by event, so the groups see "
        "the same users and policy and their difference is the prompts' (fallbacks included: "
        f'a version that fails more loses its LLM tips). "{NO_PROMPT}" is decisions without a '
        "prompt (task tips only)."
    )


def _draw_fallback_rate(fig: Figure, report: Report) -> None:
    ax = fig.add_subplot()
    fallback = report.fallback
    buckets = report.buckets.buckets
    ax.plot(
        _dates([b.middle for b in buckets]),
        fallback.over_time,
        marker="o",
        ms=3,
        color="#d62728",
        label="fallback share per bucket",
    )
    ax.axhline(
        fallback.rate,
        color="grey",
        linestyle="--",
        linewidth=1,
        label=f"overall {fallback.rate:.1%} ({fallback.n_fallback} of {fallback.n_events})",
    )
    if fallback.n_llm == 0:
        ax.text(
            0.5,
            0.6,
            "no decision asked the LLM (generation.source: tasks): nothing can fall back",
            ha="center",
            transform=ax.transAxes,
        )
    ax.set_ylim(-0.02, 1.02)
    _time_axis(ax)
    ax.set_ylabel("share of decisions")
    ax.set_title(f"LLM generation fallback rate (buckets: {report.buckets.label})")
    ax.legend(loc="upper right", fontsize=9)
    ax.grid(alpha=0.3)


def _caption_fallback_rate(report: Report) -> str:
    sources = ", ".join(f"{k}: {v}" for k, v in report.fallback.sources.items())
    return (
        "Share of decisions whose LLM generation failed (timeout, error, malformed answer, "
        "open circuit) and were served task tips instead (generation_source = fallback), per "
        f"time bucket. Generation sources in this window: {sources}. A spike is an LLM "
        "outage; a steady share is a slow or unreliable model or prompt."
    )


PLOTS: tuple[Plot, ...] = (
    Plot("ope_value.png", "Estimated value per policy", _draw_ope_value, _caption_ope_value),
    Plot(
        "reward_over_time.png",
        "Reward over time",
        _draw_reward_over_time,
        _caption_reward_over_time,
    ),
    Plot(
        "shadow_agreement.png",
        "Shadow agreement",
        _draw_shadow_agreement,
        _caption_shadow_agreement,
    ),
    Plot(
        "value_by_prompt_version.png",
        "Value per prompt version",
        _draw_value_by_prompt_version,
        _caption_value_by_prompt_version,
    ),
    Plot("fallback_rate.png", "Fallback rate", _draw_fallback_rate, _caption_fallback_rate),
)
"""Every plot, in page order; the file names are stable (MLflow and tests look for them)."""


def render_png(plot: Plot, report: Report) -> bytes:
    """One plot as PNG bytes of exactly WIDTH × HEIGHT pixels."""
    # Heavy: only a process that plots loads Matplotlib (every CLI command imports this).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH / DPI, HEIGHT / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    plot.draw(fig, report)
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


# -- JSON and HTML ----------------------------------------------------------------------------


def _estimate_json(estimate: Estimate | None) -> dict[str, Any] | None:
    if estimate is None:
        return None
    return {
        "value": finite(estimate.value),
        "lower": finite(estimate.lower),
        "upper": finite(estimate.upper),
        "n_events": estimate.n_events,
        "estimator": estimate.name,
        "diagnostics": None if estimate.diagnostics is None else _diagnostics_json(estimate),
    }


def _diagnostics_json(estimate: Estimate) -> dict[str, Any]:
    d = estimate.diagnostics
    if d is None:
        return {}
    return {
        "effective_sample_size": finite(d.effective_sample_size),
        "max_weight": finite(d.max_weight),
        "rare_mass": finite(d.rare_mass),
        "rare_below": d.rare_below,
    }


def _bucket_json(bucket: Bucket) -> dict[str, Any]:
    return {
        "start": bucket.start.isoformat(),
        "end": bucket.end.isoformat(),
        "n_events": bucket.n_events,
    }


def report_json(report: Report, files: Sequence[str] = ()) -> dict[str, Any]:
    """The report's numbers as JSON-ready data (non-finite numbers become null)."""
    return {
        "generated_at": datetime.now(UTC).isoformat(),
        "estimator": report.estimator,
        "n_events": report.n_events,
        "first_at": report.first_at.isoformat(),
        "last_at": report.last_at.isoformat(),
        "filters": report.filters,
        "bucket": report.buckets.label,
        "buckets": [_bucket_json(b) for b in report.buckets.buckets],
        "served_reward": _estimate_json(report.served_reward),
        "policies": [
            {
                "name": p.name,
                "role": p.role,
                "version": p.version,
                "n_models": p.n_models,
                "n_runs": p.n_runs,
                "n_scored": p.n_scored,
                "estimate": _estimate_json(p.estimate),
                "note": p.note,
                "over_time": [_estimate_json(e) for e in p.over_time],
            }
            for p in report.policies
        ],
        "agreement": [
            {
                "name": a.name,
                "rate": a.rate,
                "n_events": a.n_events,
                "over_time": a.over_time,
            }
            for a in report.agreement
        ],
        "prompt_versions": [
            {
                "prompt_version": g.prompt_version,
                "n_events": g.n_events,
                "reward": _estimate_json(g.reward),
                "fallback_rate": g.fallback_rate,
            }
            for g in report.prompt_versions
        ],
        "fallback": {
            "rate": report.fallback.rate,
            "n_fallback": report.fallback.n_fallback,
            "n_events": report.fallback.n_events,
            "n_llm": report.fallback.n_llm,
            "sources": report.fallback.sources,
            "over_time": report.fallback.over_time,
        },
        "lift": [
            {
                "day": g.day,
                "lift": finite(g.lift),
                "lower": finite(g.lower),
                "upper": finite(g.upper),
                "bandit_mean": finite(g.bandit_mean),
                "holdout_mean": finite(g.holdout_mean),
                "n_bandit": g.n_bandit,
                "n_holdout": g.n_holdout,
            }
            for g in report.lift
        ],
        "feature_importance": [
            {
                "left_out": g.left_out,
                "estimate": _estimate_json(g.estimate),
                "change": finite(g.change),
            }
            for g in report.importance
        ],
        "notes": report.notes,
        "files": list(files),
    }


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1040px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; }
figcaption { font-size: 0.9em; color: #444; max-width: 1000px; }
.meta { color: #555; }
"""


def _cell(value: object, *, num: bool = False) -> str:
    css = ' class="num"' if num else ""
    return f"<td{css}>{html.escape(str(value))}</td>"


def _number(value: float | None, fmt: str = ".4f") -> str:
    return "—" if value is None else format(value, fmt)


def _support(estimate: Estimate | None) -> str:
    d = None if estimate is None else estimate.diagnostics
    if d is None:
        return "—"
    return (
        f"ESS {d.effective_sample_size:.0f} ({d.ess_share:.0%}), w ≤ {d.max_weight:.3g}, "
        f"{d.rare_mass:.1%} on p < {d.rare_below:g}"
    )


def _policy_table(report: Report) -> str:
    agreement = {a.name: a for a in report.agreement}
    rows = []
    for p in report.policies:
        e = p.estimate
        a = agreement.get(p.name)
        rows.append(
            "<tr>"
            + _cell(p.name)
            + _cell(p.role)
            + _cell((p.version or "—") + (f" ({p.n_models} models)" if p.n_models > 1 else ""))
            + _cell(f"{p.n_scored} of {report.n_events}", num=True)
            + _cell(_number(e.value if e else None), num=True)
            + _cell(_number(finite(e.lower) if e else None), num=True)
            + _cell(_number(finite(e.upper) if e else None), num=True)
            + _cell("—" if a is None or a.rate is None else f"{a.rate:.1%}", num=True)
            + _cell(_support(e))
            + _cell(p.note or "")
            + "</tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "policy",
            "role",
            "version (last seen)",
            "decisions",
            f"estimate ({html.escape(report.estimator)})",
            "95% lower",
            "95% upper",
            "agreement with served",
            "support (ESS, largest weight, mass on rarely logged tips)",
            "note",
        )
    )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _table(caption: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A captioned table; ``rows`` hold already rendered cells (:func:`_cell`)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f'<p class="meta">{caption}</p><table><tr>{head}</tr>{body}</table>'


def _lift_table(report: Report) -> str:
    return _table(
        "Realised mean reward of the bandit's decisions minus the holdout's "
        "(experiment.holdout_fraction of users, served by the holdout policy): a causal "
        "measure, next to the off-policy estimates below. An interval above 0: the bandit "
        "helps.",
        ("day (UTC)", "lift", "95% interval", "bandit: mean reward", "holdout"),
        [
            (
                _cell("all days" if g.day is None else g.day),
                _cell(f"{g.lift:+.4f}", num=True),
                _cell(f"[{g.lower:+.4f}, {g.upper:+.4f}]", num=True),
                _cell(f"{g.bandit_mean:.4f} (n = {g.n_bandit})", num=True),
                _cell(f"{g.holdout_mean:.4f} (n = {g.n_holdout})", num=True),
            )
            for g in report.lift
        ],
    )


def _importance_table(report: Report) -> str:
    return _table(
        "The served configuration replayed on this log as it would have learned it, then "
        "the same with each feature group left out "
        f"({html.escape(report.importance[0].estimate.name)}). A negative change: the "
        "group carries signal. The intervals are of each value, not of the change.",
        ("left out", "progressive value", "95% lower", "95% upper", "change"),
        [
            (
                _cell("nothing (as served)" if g.left_out is None else g.left_out),
                _cell(_number(g.estimate.value), num=True),
                _cell(_number(finite(g.estimate.lower)), num=True),
                _cell(_number(finite(g.estimate.upper)), num=True),
                _cell("—" if g.left_out is None else f"{g.change:+.4f}", num=True),
            )
            for g in report.importance
        ],
    )


def _prompt_table(report: Report) -> str:
    rows = [
        "<tr>"
        + _cell(g.prompt_version)
        + _cell(g.n_events, num=True)
        + _cell(_number(g.reward.value), num=True)
        + _cell(_number(finite(g.reward.lower)), num=True)
        + _cell(_number(finite(g.reward.upper)), num=True)
        + _cell(f"{g.fallback_rate:.1%}", num=True)
        + "</tr>"
        for g in report.prompt_versions
    ]
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "prompt version",
            "decisions",
            "realised mean reward",
            "95% lower",
            "95% upper",
            "fallback rate",
        )
    )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def report_html(report: Report, images: dict[str, bytes]) -> str:
    """One self-contained page: tables, then every plot inline with its caption."""
    filters = ", ".join(f"{k} = {v}" for k, v in report.filters.items() if v is not None)
    served = report.served_reward
    parts = [
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">',
        "<title>tipgraph report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>tipgraph report</h1>",
        f'<p class="meta">{report.n_events} decisions with rewards, '
        f"{report.first_at:%Y-%m-%d %H:%M:%S} to {report.last_at:%Y-%m-%d %H:%M:%S} UTC"
        f"{'; filters: ' + html.escape(filters) if filters else ''}. "
        f"Realised mean reward {html.escape(_interval(served))}. Estimator "
        f"{html.escape(report.estimator)} (the tuning config's); time buckets "
        f"{html.escape(report.buckets.label)}.</p>",
    ]
    parts += [f'<p class="meta">{html.escape(note)}</p>' for note in report.notes]
    if report.lift:
        parts += ["<h2>On-policy lift over the holdout</h2>", _lift_table(report)]
    parts += ["<h2>Policies</h2>", _policy_table(report)]
    parts += ["<h2>Prompt versions</h2>", _prompt_table(report)]
    if report.importance:
        parts += ["<h2>Feature-group importance (served policy)</h2>", _importance_table(report)]
    for plot in PLOTS:
        data = base64.b64encode(images[plot.filename]).decode("ascii")
        parts.append(
            f"<h2>{html.escape(plot.title)}</h2><figure>"
            f'<img src="data:image/png;base64,{data}" width="{WIDTH}" height="{HEIGHT}" '
            f'alt="{html.escape(plot.title)}">'
            f"<figcaption>{html.escape(plot.caption(report))}</figcaption></figure>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(report: Report, out: Path) -> list[Path]:
    """Write every PNG, ``report.html`` and ``report.json`` into ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    images = {plot.filename: render_png(plot, report) for plot in PLOTS}
    written = []
    for name, data in images.items():
        path = out / name
        path.write_bytes(data)
        written.append(path)
    page = out / HTML_FILE
    page.write_text(report_html(report, images), encoding="utf-8")
    written.append(page)
    numbers = out / JSON_FILE
    names = [p.name for p in [*written, numbers]]
    numbers.write_text(json.dumps(report_json(report, names), indent=2) + "\n", encoding="utf-8")
    written.append(numbers)
    logger.info("wrote the report (%d files) to %s", len(written), out)
    return written
