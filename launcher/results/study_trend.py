"""How far each arm of a study stays below its dense model as the budget grows, and the budget at which its trend
would reach a goal.

An *arm* is the rows of one (model, format, ratio, method, variant), over budgets and seeds. Its gap at a budget
is final top-1 minus the row's own dense parent (points; mean over the seeds there). The trend is a least-squares
line of the gap against log2(budget) through every row of the arm: the gain per doubling of the budget. Beside it
stands the gain of the last doubling alone (between the arm's two largest budgets), because returns can shrink as
the budget grows and a line through the small budgets then promises too much. Where a goal is given for the
arm's ratio (``--goal 0.33=1.0``: within 1.0 point of dense at keep 0.33) and no budget run has met it, both are
extrapolated to the budget that would meet it: estimates to be checked by running that budget, not measurements.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

from launcher.schema import ConfigError

TREND_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("format", "format", "text"), ("keep_ratio", "keep", "text"), ("method", "method", "text"),
    ("variant", "variant", "text"), ("gaps", "final - dense by budget (epochs: points)", "text"),
    ("rows", "rows", "text"), ("per_doubling", "points per doubling", "num"),
    ("last_doubling", "last doubling (points)", "num"), ("goal", "goal (points)", "text"),
    ("reach", "budget for the goal", "text"),
)


def parse_goals(text: str) -> dict[float, float]:
    """``"0.33=1.0,0.2=2.5"`` -> {0.33: 1.0, 0.2: 2.5}: the most points below dense each keep ratio may end."""
    goals: dict[float, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        keep, sep, points = item.partition("=")
        try:
            k, p = float(keep), float(points)
        except ValueError:
            k = p = math.nan
        if not sep or not 0 < k <= 1 or not p >= 0:
            raise ConfigError(f"--goal: {item!r} is not KEEP=POINTS (KEEP a keep ratio in (0, 1], POINTS >= 0), "
                              f"e.g. 0.33=1.0,0.2=2.5")
        goals[k] = p
    return goals


def fit_log2(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(intercept, slope) of gap = intercept + slope * log2(budget); None with fewer than two budgets."""
    xs, ys = [math.log2(b) for b, _ in points], [g for _, g in points]
    if len(set(xs)) < 2:
        return None
    line = statistics.linear_regression(xs, ys)
    return line.intercept, line.slope


def last_doubling(by_budget: dict[int, float]) -> float | None:
    """Points gained per doubling between the two largest budgets of ``by_budget`` (budget -> mean gap); None
    with fewer than two budgets."""
    if len(by_budget) < 2:
        return None
    (b1, g1), (b2, g2) = sorted(by_budget.items())[-2:]
    return (g2 - g1) / math.log2(b2 / b1)


def _reach(by_budget: dict[int, float], fit: tuple[float, float] | None, last_rate: float | None,
           goal: float | None) -> tuple[str, float | None]:
    """The trend table's words for when ``goal`` is met, and that budget in epochs on the fitted line (None when
    there is none). With three budgets or more the words add where ``last_rate`` (:func:`last_doubling`) would
    meet it."""
    if goal is None:
        return "-", None
    met = [b for b, g in sorted(by_budget.items()) if g >= -goal]
    if met:
        return f"met at {met[0]}", float(met[0])
    if fit is None:
        return "one budget: no trend", None
    intercept, slope = fit
    budget = 2 ** ((-goal - intercept) / slope) if slope > 0 else None
    words = f"about {budget:.0f} (extrapolated)" if budget else "not on this trend"
    if len(by_budget) >= 3:
        words += "; " + _reach_at_last_rate(by_budget, last_rate, goal)
    return words, budget


def _reach_at_last_rate(by_budget: dict[int, float], rate: float | None, goal: float) -> str:
    """Where the gain of the last doubling, ``rate`` points, kept up, would meet ``goal`` (points below dense)."""
    last = max(by_budget)
    if rate is None or rate <= 0:
        return "the last doubling gained nothing"
    return f"about {last * 2 ** ((-goal - by_budget[last]) / rate):.0f} at the last doubling's rate"


def trend(rows: list[dict[str, Any]], goals: dict[float, float]) -> list[dict[str, Any]]:
    """One line per arm of the study rows ``rows`` (:func:`launcher.results.study_curve.study_rows`): its gap to
    dense at each budget, the fitted gain per doubling and, where ``goals`` names its keep ratio, the budget that
    meets the goal (the first run budget that did, else the trend's extrapolation). Each line also carries its
    numbers for a figure: ``by_budget`` (budget -> mean gap), ``fit`` ((intercept, slope) or None), ``goal_points``
    and ``reach_budget`` (epochs, or None)."""
    arms: dict[tuple, list[tuple[int, float]]] = {}
    for r in rows:
        if r["top1_delta"] is not None and r["budget"] > 0:
            key = (r["model"], r["format"], r["keep_ratio"], r["method"], r["variant"])
            arms.setdefault(key, []).append((r["budget"], r["top1_delta"]))
    out = []
    for (model, fmt, keep, method, var), points in arms.items():
        budgets = sorted({b for b, _ in points})
        by_budget = {b: statistics.fmean([g for bb, g in points if bb == b]) for b in budgets}
        fit, last_rate = fit_log2(points), last_doubling(by_budget)
        goal = next((p for k, p in goals.items() if keep is not None and math.isclose(k, float(keep))), None)
        reach, reach_budget = _reach(by_budget, fit, last_rate, goal)
        out.append({"model": model, "format": fmt, "keep_ratio": keep, "method": method, "variant": var,
                    "gaps": ", ".join(f"{b}: {by_budget[b]:+.2f}" for b in budgets), "rows": len(points),
                    "per_doubling": fit[1] if fit else None, "last_doubling": last_rate,
                    "goal": "-" if goal is None else f"-{goal:g}",
                    "reach": reach, "by_budget": by_budget, "fit": fit, "goal_points": goal,
                    "reach_budget": reach_budget})
    return sorted(out, key=lambda t: (str(t["model"]), str(t["format"]), -float(t["keep_ratio"] or 0),
                                      t["method"], t["variant"]))
