"""The plot of `tdcompress compare`: top-1 against parameters and against FLOPs, one marker per method/format,
the Pareto front of each panel drawn through its runs, and one line per distinct dense baseline."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.schema import ConfigError

MARKERS = "osD^vP*Xph"
MAX_BASELINES = 6  # more distinct dense baselines than this: no baseline lines (they would hide the points)


def check_plot_path(path: Path) -> Path:
    """``path`` if a PNG can be written there; a missing folder is a clear error (before anything is read)."""
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--plot: the plot is a PNG file, got {str(path)!r}; e.g. --plot compare.png")
    if not path.parent.is_dir():
        raise ConfigError(f"--plot: folder {path.parent} does not exist; create it or choose another path")
    return path


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper-left staircase: points no other beats on both cost (lower) and top-1 (higher), by cost."""
    best, out = float("-inf"), []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            out.append((x, y))
            best = y
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Write the plot of ``rows`` (compare rows, or grouped rows: then with ± std error bars) to ``path``.

    Returns None when no row has a top-1 with params or FLOPs.
    """
    panels = [(cost, label) for cost, label in (("params", "parameters"), ("flops", "FLOPs per image"))
              if any(r.get("top1") is not None and r.get(cost) is not None for r in rows)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({_label(r) for r in rows})
    style = {k: MARKERS[i % len(MARKERS)] for i, k in enumerate(kinds)}
    colors = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), dpi=120, squeeze=False)
    dense = baselines(rows)
    for ax, (cost, label) in zip(axes[0], panels):
        pts = [r for r in rows if r.get("top1") is not None and r.get(cost) is not None]
        for kind in kinds:
            mine = [r for r in pts if _label(r) == kind]
            if mine:
                ax.errorbar([r[cost] for r in mine], [r["top1"] for r in mine],
                            yerr=[r.get("top1_std", 0.0) for r in mine], fmt=style[kind], color=colors[kind],
                            markersize=8 if kind != "dense" else 11, capsize=3, label=kind, linestyle="none")
        front = _front([(r[cost], r["top1"]) for r in pts])
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.4", linewidth=1,
                linestyle="--", label="Pareto front")
        for i, (name, value) in enumerate(dense):
            ax.axhline(value, color="k", linewidth=0.8, linestyle=(0, (1, 1 + 2 * i)), label=name)
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(title or "accuracy vs model size and compute")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def baselines(rows: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """The dense baselines to draw: (legend label, top-1 %), one per distinct (model, dense_top1 to 0.01),
    by top-1. Runs compared against different dense models are never averaged into one line; with more
    than :data:`MAX_BASELINES` distinct baselines none is drawn."""
    seen: dict[tuple[str, float], float] = {}
    for r in rows:
        if r.get("dense_top1") is not None:
            model = r.get("model") if r.get("model") not in (None, "*") else ""
            seen.setdefault((model, round(float(r["dense_top1"]), 2)), float(r["dense_top1"]))
    if len(seen) > MAX_BASELINES:
        return []
    return [(" ".join(x for x in ("dense baseline", model, f"{value:.2f}%") if x), value)
            for (model, _), value in sorted(seen.items(), key=lambda kv: kv[1])]


def _label(row: dict[str, Any]) -> str:
    """Legend entry: ``dense`` or ``<method> <format> k<keep>``."""
    if row.get("method") in (None, "dense") or row.get("format") == "dense":
        return "dense"
    keep = row.get("keep_ratio")
    return f"{row.get('method')} {row.get('format')}" + (f" k{keep}" if keep not in (None, "*") else "")
