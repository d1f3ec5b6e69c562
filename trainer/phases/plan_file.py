"""The rank plan an admm phase fixed from its starting weights, kept in its phase directory.

A resume and the decompose phase read these ranks instead of planning again
from weights that ADMM has moved since. ``rank_plan.json`` holds the plan with
the compression config it was made for; ``rank_plan.txt`` beside it is its table.
"""
from __future__ import annotations

from pathlib import Path

from admm.config import CompressionConfig
from admm.planning.model_plan import plan_document, plan_from_document
from admm.planning.rank_plan import RankPlan
from trainer.checkpoints.files import atomic_write_text

PLAN_FILE = "rank_plan.json"


def save_plan(path: Path, plan: RankPlan, compression: CompressionConfig) -> Path:
    """Write ``plan`` (for ``compression``) to ``path`` and its table beside it, each atomically; returns the
    table's path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, plan_document(plan, compression))
    table = path.with_suffix(".txt")
    atomic_write_text(table, plan.table() + "\n")
    return table


def load_plan(path: Path, compression: CompressionConfig) -> RankPlan | None:
    """The plan :func:`save_plan` wrote at ``path`` for this same compression config; None when absent or
    made for another config (a resume with ``allow_config_change``: the phase plans anew)."""
    if not path.is_file():
        return None
    return plan_from_document(path.read_text(), compression)
