"""`tdcompress compare`: runs side by side from MLflow, and an accuracy-vs-compression plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.schema import ConfigError
from trainer import tracking

COLUMNS = (("top1", "top1 %"), ("top5", "top5 %"), ("compression", "params x"), ("params", "params"),
           ("flops_reduction", "FLOPs x"), ("decomposed_top1", "after decomp %"), ("dense_top1", "dense %"))


def parent_runs(uri: str, experiment: str, names: list[str] | None = None, limit: int = 20) -> list[Any]:
    """Newest parent runs (one per `tdcompress run`) of ``experiment``, optionally filtered by run name.

    Reading never creates a store: a SQLite file that does not exist is an error, not an empty database.
    """
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix):]).is_file():
        raise ConfigError(f"tracking uri: no MLflow store at {uri[len(prefix):]}; run this where `tdcompress run` "
                          "wrote mlruns.db, or pass --tracking-uri (or set MLFLOW_TRACKING_URI)")
    client = tracking.client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"experiment: no MLflow experiment {experiment!r} at {uri}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1000)
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if names:
        runs = [r for r in runs if r.info.run_name in names or r.info.run_id in names]
    return runs[:limit]


def table(runs: list[Any]) -> str:
    rows = [("run", "status", *(c[1] for c in COLUMNS))]
    for r in runs:
        m = r.data.metrics
        rows.append((r.info.run_name, r.info.status,
                     *(f"{m[k]:,.2f}" if k in m and k != "params" else f"{int(m[k]):,}" if k in m else "-"
                       for k, _ in COLUMNS)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def plot(runs: list[Any], path: Path) -> Path | None:
    """Top-1 against parameter compression, one point per run that has both."""
    points = [(r.data.metrics["compression"], r.data.metrics["top1"], r.info.run_name) for r in runs
              if "compression" in r.data.metrics and "top1" in r.data.metrics]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for x, y, name in points:
        ax.scatter(x, y)
        ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("parameter compression (dense / factored)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("accuracy vs compression")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
