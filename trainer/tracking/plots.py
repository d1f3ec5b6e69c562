"""Per-layer curves drawn at the end of a phase (PNG artifacts), with matplotlib's file-only backend."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def plot_series(path: Path, series: dict[str, Sequence[float]], *, xlabel: str, ylabel: str, title: str,
                x: Sequence[float] | None = None, log_y: bool = False, legend: bool = True) -> Path:
    """One line per entry of ``series`` (name -> values at ``x``, default 0, 1, ...), written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # workers have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, values in series.items():
        ax.plot(range(len(values)) if x is None else x, values, lw=1, alpha=0.8, marker=".", label=name)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
