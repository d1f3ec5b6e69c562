"""A study's reading from its run records: every row's accuracy at each stage, ADMM against direct decomposition
by training budget and compression ratio (the budget curve), and the best model per ratio.

A row's *budget* is the epochs it trains after its dense parent (ADMM + fine-tuning, or fine-tuning alone), so
an ADMM row and a direct row of one budget cost the same. Its *variant* says how it differs from the plain arm,
read from its config: ``fixed-rho`` (ADMM with rho held constant, the peer's schedule), ``one-curve`` (fine-tuning
continues ADMM's learning-rate curve), ``distill`` (knowledge distillation from the dense model). An ADMM row is
paired with the direct row of the same model, format, ratio, budget, seed and distillation, and the curve is
ADMM's final top-1 minus direct's, as mean ± std over the seeds that have both.
"""
from __future__ import annotations

import math
from typing import Any

from launcher.schema import ConfigError

TRAINING_AFTER_DENSE = ("admm", "finetune", "rank_prune")
TABLES = ("rows", "curve", "best", "trend")

# (key, header, kind) in launcher.results.compare's column format, so its renderer draws these tables too.
ROW_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("run", "run", "text"), ("method", "method", "text"), ("variant", "variant", "text"),
    ("format", "format", "text"), ("keep_ratio", "keep", "text"), ("budget", "budget (epochs)", "text"),
    ("seed", "seed", "text"), ("dense_top1", "dense top1 %", "num"), ("admm_top1", "end of ADMM %", "num"),
    ("decomposed_top1", "after decomp %", "num"), ("top1", "final top1 %", "num"), ("best_top1", "best epoch %", "num"),
    ("top1_delta", "final - dense", "num"),
)


def _phases(params: dict[str, str]) -> list[tuple[int, str, int]]:
    """(index, kind, epochs) of every phase in the flattened config ``params``."""
    out, i = [], 0
    while f"phases.{i}.kind" in params:
        epochs = params.get(f"phases.{i}.epochs")
        out.append((i, params[f"phases.{i}.kind"], int(epochs) if epochs not in (None, "None", "") else 0))
        i += 1
    return out


def _distilled(params: dict[str, str], index: int) -> bool:
    key = f"phases.{index}.distill"
    return any(k == key and v not in ("None", "", "{}") or k.startswith(key + ".") for k, v in params.items())


def variant(params: dict[str, str], method: str) -> str:
    """How a row differs from its plain arm (see the module docstring); ``plain`` when it does not."""
    parts = []
    if method == "admm" and params.get("admm.rho_growth") in ("1", "1.0"):
        parts.append("fixed-rho")
    if params.get("optim.schedule") == "one_curve":
        parts.append("one-curve")
    if any(_distilled(params, i) for i, _, _ in _phases(params)):
        parts.append("distill")
    return "+".join(parts) or "plain"


def _phase_top1(rec: dict[str, Any], kinds: tuple[str, ...]) -> list[float]:
    """Every end-of-epoch top-1 of the phases of ``kinds``, in order."""
    out: list[float] = []
    for ph in sorted(rec.get("phases", []), key=lambda p: p.get("index", 0)):
        if ph.get("kind") in kinds:
            out += [v for _, v in ph.get("history", {}).get("top1", [])]
    return out


def study_row(rec: dict[str, Any]) -> dict[str, Any]:
    """One run record as a study row: identity, budget, variant and top-1 at each stage (percent)."""
    p, t, m = rec["params"], rec["tags"], rec["metrics"]
    method = t.get("method", "")
    admm, tuned = _phase_top1(rec, ("admm",)), _phase_top1(rec, ("finetune", "rank_prune"))
    row = {"run": rec["name"], "method": method, "variant": variant(p, method), "model": t.get("model"),
           "format": t.get("format"), "keep_ratio": t.get("keep_ratio"), "seed": t.get("seed"),
           "budget": sum(e for _, k, e in _phases(p) if k in TRAINING_AFTER_DENSE),
           "dense_top1": m.get("dense_top1"), "admm_top1": admm[-1] if admm else None,
           "decomposed_top1": m.get("decomposed_top1"), "top1": m.get("top1"),
           "best_top1": max(tuned) if tuned else None, "command": t.get("tdcompress.command")}
    row["top1_delta"] = (row["top1"] - row["dense_top1"]) if None not in (row["top1"], row["dense_top1"]) else None
    return row


def study_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished compressed rows (dense parents left out), by format, ratio, budget, method, variant, seed."""
    rows = [study_row(r) for r in records if r.get("status") == "FINISHED"]
    rows = [r for r in rows if r["method"] not in ("dense", "") and r["top1"] is not None]
    return sorted(rows, key=lambda r: (str(r["format"]), -float(r["keep_ratio"] or 0), r["budget"], r["method"],
                                       r["variant"], str(r["seed"])))


def mean_std(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def curve(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ADMM minus direct per (model, format, ratio, ADMM variant, budget): mean ± std over the seeds where both
    arms finished; ``n`` seeds. Each arm counts as its final top-1 minus its own dense parent's (points), so a
    pair whose rows started from different parents (another machine's model of the same seed) compares the
    distances each arm lost; from one parent that is the plain top-1 difference. A row that measured no dense
    parent pairs with nothing, as it counts in no trend. Rows come by format, ratio (3x before 5x), variant,
    budget."""
    direct = {(r["model"], r["format"], r["keep_ratio"], r["budget"], r["seed"], "distill" in r["variant"]): r
              for r in rows if r["method"] == "direct"}
    cells: dict[tuple, list[tuple[float, float, float]]] = {}
    for r in rows:
        if r["method"] != "admm":
            continue
        d = direct.get((r["model"], r["format"], r["keep_ratio"], r["budget"], r["seed"], "distill" in r["variant"]))
        if d is not None and None not in (r["top1_delta"], d["top1_delta"]):
            key = (r["model"], r["format"], r["keep_ratio"], r["variant"], r["budget"])
            a, b = r["top1_delta"], d["top1_delta"]
            cells.setdefault(key, []).append((a - b, a, b))
    out = []
    for (model, fmt, keep, var, budget), xs in cells.items():
        gap, gap_std = mean_std([x[0] for x in xs])
        out.append({"model": model, "format": fmt, "keep_ratio": keep, "variant": var, "budget": budget,
                    "n": len(xs), "admm_delta": mean_std([x[1] for x in xs])[0],
                    "direct_delta": mean_std([x[2] for x in xs])[0], "gap": gap, "gap_std": gap_std})
    return sorted(out, key=lambda c: (str(c["model"]), str(c["format"]), -float(c["keep_ratio"] or 0), c["variant"],
                                      c["budget"]))


CURVE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("format", "format", "text"), ("keep_ratio", "keep", "text"), ("variant", "ADMM variant", "text"),
    ("budget", "budget (epochs)", "text"), ("n", "seeds", "text"), ("admm_delta", "ADMM - dense", "num"),
    ("direct_delta", "direct - dense", "num"), ("gap", "ADMM - direct", "num"),
)


def best_per_ratio(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The row with the highest final top-1 at each (model, ratio), any method and budget: the best model this
    study made at that size, with its command."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["model"], r["keep_ratio"])
        if key not in best or r["top1"] > best[key]["top1"]:
            best[key] = r
    return sorted(best.values(), key=lambda r: (str(r["model"]), -float(r["keep_ratio"] or 0)))


BEST_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("keep_ratio", "keep", "text"), ("run", "run", "text"), ("method", "method", "text"),
    ("variant", "variant", "text"), ("budget", "budget (epochs)", "text"), ("dense_top1", "dense top1 %", "num"),
    ("top1", "final top1 %", "num"), ("top1_delta", "final - dense", "num"), ("command", "command", "text"),
)


def table(rows: list[dict[str, Any]], which: str, fmt: str, where: str, goals: dict[float, float] | None = None) -> str:
    """The ``which`` table (rows, curve, best or trend) of the study rows ``rows`` (:func:`study_rows` of the
    records in ``where``), rendered as ``fmt``; ``goals``: the trend table's points below dense per keep ratio."""
    from launcher.results.compare import render
    from launcher.results.study_trend import TREND_COLUMNS, trend

    if which not in TABLES:
        raise ConfigError(f"--table: must be one of {', '.join(TABLES)}, got {which!r}")
    if not rows:
        return f"(no finished compressed rows in {where} yet)"
    if which == "rows":
        return render(rows, fmt, spec=ROW_COLUMNS)
    if which == "best":
        return render(best_per_ratio(rows), fmt, spec=BEST_COLUMNS)
    if which == "trend":
        return render(trend(rows, goals or {}), fmt, spec=TREND_COLUMNS)
    pairs = curve(rows)
    if not pairs:
        return f"(no ADMM row in {where} has its direct row of the same budget and seed yet)"
    for c in pairs:  # the gap's std reads as ± beside it, as in compare's grouped tables
        if c["n"] < 2:
            c.pop("gap_std")
    return render(pairs, fmt, spec=CURVE_COLUMNS)
