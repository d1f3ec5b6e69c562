"""The budget curve as a figure: each arm's distance from its dense model by budget, with its trend and the goals
(left), and ADMM minus direct (right); budgets on a log2 axis, where the trends are straight lines."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from launcher.results.study_curve import curve
from launcher.results.study_trend import trend

_STYLE = {"admm": "-", "direct": "--"}
# A single budget draws no line, so the marker alone must tell the arms apart: filled circles for ADMM,
# open squares for direct decomposition.
_MARKER = {"admm": {"marker": "o"}, "direct": {"marker": "s", "markerfacecolor": "white"}}


def _colours(rows: list[dict[str, Any]]) -> dict[tuple, str]:
    """One colour per (format, keep ratio, variant), shared by both panels, so a pair's arms (solid: ADMM,
    dashed: direct) and its ADMM - direct line read as one colour."""
    keys = sorted({(r["format"], r["keep_ratio"], r["variant"]) for r in rows}, key=lambda k: tuple(map(str, k)))
    return {k: f"C{i % 10}" for i, k in enumerate(keys)}


def _legend_below(ax: Any) -> None:
    """The legend under the axes, where it hides no point however many arms there are."""
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)


def _budget_axis(ax: Any, budgets: list[int], reach: float = 0.0) -> None:
    """A log2 budget axis ticked at the budgets run, wide enough to show an extrapolated ``reach`` too."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(budgets)), [str(b) for b in sorted(set(budgets))])
    ax.minorticks_off()
    lo, hi = min(budgets), max(max(budgets), reach)
    ax.set_xlim(lo / 1.15, hi * 1.15)


def _draw_distance(ax: Any, rows: list[dict[str, Any]], goals: dict[float, float],
                   colours: dict[tuple, str]) -> None:
    """Each arm's final - dense by budget, its log2 trend (dotted, on to an extrapolated goal) and the goals."""
    budgets: list[int] = []
    reach = 0.0
    for arm in trend(rows, goals):
        xs = sorted(arm["by_budget"])
        label = f"{arm['format']} keep {arm['keep_ratio']} {arm['method']}" + \
            ("" if arm["variant"] == "plain" else f" ({arm['variant']})")
        (line,) = ax.plot(xs, [arm["by_budget"][b] for b in xs], label=label,
                          linestyle=_STYLE.get(arm["method"], ":"), **_MARKER.get(arm["method"], {"marker": "^"}),
                          color=colours[(arm["format"], arm["keep_ratio"], arm["variant"])])
        budgets += xs
        if arm["fit"] is None:
            continue
        end = max(xs[-1], arm["reach_budget"] or 0)
        intercept, slope = arm["fit"]
        grid = [xs[0] * (end / xs[0]) ** (i / 20) for i in range(21)]
        ax.plot(grid, [intercept + slope * math.log2(b) for b in grid], color=line.get_color(), linestyle=":",
                linewidth=1)
        if end > xs[-1]:
            ax.annotate(f"~{end:.0f}", (end, -arm["goal_points"]), fontsize=7, color=line.get_color(),
                        ha="center", va="bottom")
            reach = max(reach, end)
    for keep, points in sorted(goals.items()):
        ax.axhline(-points, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"goal at keep {keep:g}: -{points:g}", (0.01, -points), xycoords=("axes fraction", "data"),
                    fontsize=7, va="bottom", color="grey")
    ax.axhline(0.0, color="black", linewidth=0.8)
    _budget_axis(ax, budgets, reach)
    ax.set(xlabel="training budget after the dense model (epochs, log2)", ylabel="final - dense top-1 (points)",
           title="distance from the dense model by budget (dotted: log2 trend)")
    _legend_below(ax)


def _draw_admm_minus_direct(ax: Any, rows: list[dict[str, Any]], colours: dict[tuple, str]) -> None:
    lines: dict[tuple, list[dict[str, Any]]] = {}
    for c in curve(rows):
        lines.setdefault((c["format"], c["keep_ratio"], c["variant"]), []).append(c)
    for (fmt, keep, var), cells in sorted(lines.items(), key=lambda kv: tuple(map(str, kv[0]))):
        ax.errorbar([c["budget"] for c in cells], [c["gap"] for c in cells], yerr=[c["gap_std"] for c in cells],
                    marker="o", capsize=3, label=f"{fmt} keep {keep}" + ("" if var == "plain" else f" ({var})"),
                    color=colours[(fmt, keep, var)])
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set(xlabel="training budget after the dense model (epochs, log2)",
           ylabel="ADMM - direct, final top-1 (points)", title="where ADMM pays (above zero)")
    if lines:
        _budget_axis(ax, [c["budget"] for cells in lines.values() for c in cells])
        _legend_below(ax)


def curve_figure(rows: list[dict[str, Any]], goals: dict[float, float] | None = None) -> Any:
    """The matplotlib figure of the study rows ``rows`` (:func:`launcher.results.study_curve.study_rows`).

    Left: each arm's final top-1 minus its rows' dense parents (points; mean over seeds) against its budget in
    epochs, one line per (format, ratio, method, variant: ADMM solid with filled circles, direct dashed with open
    squares), with its log2 trend (thin dotted line, drawn on to the budget that meets its goal when that is an
    extrapolation) and each goal of ``goals`` (keep ratio -> points below dense) as a grey line. Right: ADMM
    minus direct at each budget (bars: std over seeds), one line per (format, ratio, ADMM variant); above zero
    ADMM pays. A (format, ratio, variant) has one colour in both panels; legends sit under the panels. The
    caller closes it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colours = _colours(rows)
    _draw_distance(left, rows, goals or {}, colours)
    _draw_admm_minus_direct(right, rows, colours)
    fig.tight_layout()
    return fig


def plot_curve(rows: list[dict[str, Any]], path: Path, goals: dict[float, float] | None = None) -> Path | None:
    """Write :func:`curve_figure` of ``rows`` to ``path`` (PNG, legends included); None when ``rows`` is empty."""
    if not rows:
        return None
    fig = curve_figure(rows, goals)
    import matplotlib.pyplot as plt  # after curve_figure has chosen the Agg backend

    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
