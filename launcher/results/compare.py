"""`tdcompress compare`: finished runs side by side from MLflow, grouped over seeds, with their Pareto fronts.

Rows are parent runs (one per `tdcompress run`), selected with MLflow filter strings
(``params.compression.format = 'tucker2'``), FINISHED only unless asked otherwise. Output: an
aligned table, markdown (what RESULTS.md is made of), CSV or JSON; the plot is in
:mod:`launcher.results.compare_plot`. Reading never creates a store.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, get_args

from launcher.schema import ConfigError
from trainer.tracking import tracker as tracking

OutputFormat = Literal["table", "markdown", "csv", "json"]
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)

# (key, header, kind): kind "text" is copied, "num" is printed with 2 decimals, "int" with thousands separators.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("run", "run", "text"), ("status", "status", "text"), ("model", "model", "text"), ("method", "method", "text"),
    ("format", "format", "text"), ("keep_ratio", "keep", "text"), ("seed", "seed", "text"),
    ("dense_top1", "dense top1 %", "num"), ("decomposed_top1", "after decomp %", "num"), ("top1", "top1 %", "num"),
    ("top1_delta", "delta vs dense", "num"), ("params", "params", "int"), ("compression", "params x", "num"),
    ("flops", "FLOPs/img", "int"), ("flops_reduction", "FLOPs x", "num"), ("epochs", "epochs", "text"),
    ("wall_min", "wall min", "num"), ("device", "device", "text"), ("pareto", "pareto", "text"),
    ("command", "command", "text"),
)
GROUP_KEYS: tuple[str, ...] = ("model", "method", "format", "keep_ratio", "dataset", "seed")
_METRICS = ("dense_top1", "decomposed_top1", "top1", "top1_delta", "params", "compression", "flops",
            "flops_reduction")


def store_uri(uri: str) -> str:
    """``uri`` when a store is there; reading never creates one (a missing SQLite file is an error)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix):]).is_file():
        raise ConfigError(f"tracking uri: no MLflow store at {uri[len(prefix):]}; run this where `tdcompress run` "
                          "wrote mlruns.db, or pass --tracking-uri (or set MLFLOW_TRACKING_URI)")
    return uri


def parent_runs(uri: str, experiment: str, names: list[str] | None = None, limit: int = 100,
                filter_string: str = "", include_all: bool = False) -> list[Any]:
    """Newest parent runs of ``experiment`` matching ``filter_string`` (MLflow search syntax), FINISHED only
    unless ``include_all``, optionally restricted to run names or ids ``names``."""
    from mlflow.exceptions import MlflowException

    client = tracking.client(store_uri(uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"experiment: no MLflow experiment {experiment!r} at {uri}")
    clauses = [f for f in (filter_string.strip(), "" if include_all else "attributes.status = 'FINISHED'") if f]
    try:
        runs = client.search_runs([exp.experiment_id], filter_string=" and ".join(clauses),
                                  order_by=["attributes.start_time DESC"], max_results=5000)
    except MlflowException as e:
        raise ConfigError(f"--filter: MLflow cannot read {filter_string!r} ({tracking.short_error(e)}); write e.g. "
                          "\"params.compression.format = 'tucker2' and tags.method = 'admm'\"") from None
    runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if names:
        runs = [r for r in runs if r.info.run_name in names or r.info.run_id in names]
    return runs[:limit]


def _epochs(params: dict[str, str]) -> str:
    """``pretrain:2 admm:2 decompose finetune:1``: the phases and their epochs, from the flattened config."""
    out, i = [], 0
    while f"phases.{i}.kind" in params:
        kind, epochs = params[f"phases.{i}.kind"], params.get(f"phases.{i}.epochs")
        out.append(f"{kind}:{epochs}" if kind in ("pretrain", "admm", "finetune", "rank_prune") and epochs
                   else kind)
        i += 1
    return " ".join(out)


def row_of(run: Any) -> dict[str, Any]:
    """One parent run as a flat row: identity tags, accuracy and cost metrics, phases, wall time, command."""
    tags, m, p, info = run.data.tags, run.data.metrics, run.data.params, run.info
    row: dict[str, Any] = {"run": info.run_name, "run_id": info.run_id, "status": info.status,
                           "model": tags.get("model", p.get("model.name")), "method": tags.get("method"),
                           "format": tags.get("format", p.get("compression.format")),
                           "keep_ratio": tags.get("keep_ratio", p.get("compression.keep_ratio")),
                           "dataset": tags.get("dataset", p.get("data.dataset")),
                           "seed": tags.get("seed", p.get("seed")), "epochs": _epochs(p), "device": tags.get("device"),
                           "command": tags.get("tdcompress.command")}
    row.update({k: m.get(k) for k in _METRICS})
    if row["params"] is None:
        row["params"] = m.get("params_factored")
    if row["flops"] is None:
        row["flops"] = m.get("flops_factored")
    if row["dense_top1"] is not None and row["top1"] is not None and row["top1_delta"] is None:
        row["top1_delta"] = row["top1"] - row["dense_top1"]
    ended = info.end_time or None
    row["wall_min"] = (ended - info.start_time) / 60000 if ended and info.start_time else None
    return row


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    """Set ``pareto`` on each row: which fronts it is on ("params", "flops"): no other row has at least its
    top-1 at no more cost, and one of the two strictly better. Rows without the numbers are on none."""
    for row in rows:
        row["pareto"] = ""
    for cost in ("params", "flops"):
        pts = [r for r in rows if r.get("top1") is not None and r.get(cost) is not None]
        for r in pts:
            dominated = any(o is not r and o["top1"] >= r["top1"] and o[cost] <= r[cost]
                            and (o["top1"] > r["top1"] or o[cost] < r[cost]) for o in pts)
            if not dominated:
                r["pareto"] = ",".join(x for x in (r["pareto"], cost) if x)


def group(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Rows of the same ``keys`` values as one: numbers as mean ± std (sample std, n > 1), ``n`` runs; a group
    of one run keeps its name. Groups come sorted by their key values."""
    bad = [k for k in keys if k not in GROUP_KEYS]
    if bad:
        raise ConfigError(f"--group-by: unknown key(s) {', '.join(bad)}; allowed: {', '.join(GROUP_KEYS)}")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for vals, members in groups.items():
        name = members[0]["run"] if len(members) == 1 else f"{len(members)} runs"
        g: dict[str, Any] = {"run": name, "n": len(members), **dict(zip(keys, vals))}
        for key, _, kind in COLUMNS:
            if kind == "text" and key not in g:
                same = {m.get(key) for m in members}
                g[key] = same.pop() if len(same) == 1 else "*"
            elif kind != "text":
                xs = [m[key] for m in members if m.get(key) is not None]
                if xs:
                    mean = sum(xs) / len(xs)
                    g[key] = mean
                    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
                    g[key + "_std"] = math.sqrt(var)
        out.append(g)
    # Groups in the order of their key values (method, format, keep...), so tables read the same every time.
    return sorted(out, key=lambda g: tuple(str(g.get(k)) for k in keys))


def _cell(row: dict[str, Any], key: str, kind: str) -> str:
    v = row.get(key)
    if v is None or v == "":
        return "-"
    if kind == "text":
        return str(v)
    text = f"{int(round(v)):,}" if kind == "int" else f"{v:.2f}"
    std = row.get(key + "_std")
    return f"{text} ± {std:,.0f}" if std is not None and kind == "int" else f"{text} ± {std:.2f}" if std is not None \
        else text


def render(rows: list[dict[str, Any]], fmt: str, columns: list[str] | None = None,
           spec: tuple[tuple[str, str, str], ...] = COLUMNS) -> str:
    """``rows`` as ``fmt`` (table, markdown, csv, json); ``columns``: the keys to show (default: all with data);
    ``spec``: the (key, header, kind) of every column there is (default: compare's own)."""
    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"--format: must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    if fmt == "json":
        return json.dumps(rows, indent=1, default=str)
    cols = [c for c in spec if (c[0] in columns if columns else any(r.get(c[0]) not in (None, "") for r in rows))]
    if any("n" in r for r in rows) and all(k != "n" for k, _, _ in cols):
        cols.insert(1, ("n", "n", "text"))
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([k for k, _, _ in cols] + [k + "_std" for k, _, kind in cols if kind != "text"
                                              and any(k + "_std" in r for r in rows)])
        for r in rows:
            w.writerow(["" if r.get(k) is None else r[k] for k, _, _ in cols] +
                       [r.get(k + "_std", "") for k, _, kind in cols if kind != "text"
                        and any(k + "_std" in x for x in rows)])
        return buf.getvalue()
    head = [h for _, h, _ in cols]
    body = [[_cell(r, k, kind) for k, _, kind in cols] for r in rows]
    if fmt == "markdown":
        esc = [[re.sub(r"\|", r"\\|", c) for c in line] for line in body]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in esc])
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body])
