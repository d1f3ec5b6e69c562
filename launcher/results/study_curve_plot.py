"""The budget curve as a figure: final top-1 by budget for every arm (left) and ADMM minus direct (right)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.results.study_curve import curve, mean_std

_STYLE = {"admm": "-", "direct": "--"}


def plot_curve(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Write the figure of the study rows ``rows`` (:func:`launcher.results.study_curve.study_rows`) to ``path`` (PNG).

    Left: each arm's final top-1 (mean over seeds, bars: std) against its budget in epochs, one line per
    (format, ratio, method, variant), the dense baselines dotted. Right: ADMM minus direct at each budget
    (points), one line per (format, ratio, ADMM variant); above zero ADMM pays. None when ``rows`` is empty.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    arms: dict[tuple, dict[int, list[float]]] = {}
    for r in rows:
        key = (r["format"], r["keep_ratio"], r["method"], r["variant"])
        arms.setdefault(key, {}).setdefault(r["budget"], []).append(r["top1"])
    for (fmt, keep, method, var), by_budget in sorted(arms.items(), key=lambda kv: tuple(map(str, kv[0]))):
        xs = sorted(by_budget)
        stats = [mean_std(by_budget[b]) for b in xs]
        left.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                      linestyle=_STYLE.get(method, ":"), label=f"{fmt} keep {keep} {method}"
                      + ("" if var == "plain" else f" ({var})"))
    for dense in sorted({r["dense_top1"] for r in rows if r["dense_top1"] is not None}):
        left.axhline(dense, color="grey", linestyle=":", linewidth=1)
        left.annotate(f"dense {dense:.2f}", (0.01, dense), xycoords=("axes fraction", "data"), fontsize=7,
                      va="bottom", color="grey")
    left.set(xlabel="training budget after the dense model (epochs)", ylabel="final top-1 (%)",
             title="final top-1 by budget")
    left.legend(fontsize=7)
    lines: dict[tuple, list[dict[str, Any]]] = {}
    for c in curve(rows):
        lines.setdefault((c["format"], c["keep_ratio"], c["variant"]), []).append(c)
    for (fmt, keep, var), cells in sorted(lines.items(), key=lambda kv: tuple(map(str, kv[0]))):
        right.errorbar([c["budget"] for c in cells], [c["gap"] for c in cells],
                       yerr=[c["gap_std"] for c in cells], marker="o", capsize=3,
                       label=f"{fmt} keep {keep}" + ("" if var == "plain" else f" ({var})"))
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set(xlabel="training budget after the dense model (epochs)", ylabel="ADMM - direct, final top-1 (points)",
              title="where ADMM pays (above zero)")
    if lines:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
