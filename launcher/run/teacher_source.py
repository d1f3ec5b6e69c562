"""The driver's side of ``phases.N.distill.teacher``: resolve, check and pin each teacher's weights.

A teacher is resolved like ``model.init`` (``init`` means model.init's own source) and checked
against the architecture it will be built as, before Ray or any worker starts: a wrong teacher costs
a ConfigError naming ``phases.N.distill.teacher``. Once the run directory exists its weights are
copied there (``teachers/<key>.pt``, written atomically, a plain state_dict); workers load that copy,
pinned by its sha256. A resumed run takes the same copy, so its teacher is the one the run started
with even when the source run has moved on or pruned its checkpoints since.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from launcher.config import ConfigError
from launcher.run.init_source import resolve_dense
from launcher.schema import Config
from trainer.init_weights import InitError, InitSource, check_compatible, load_state, resolve_path
from trainer.models import build_model
from trainer.tracking import tracker as tracking

TEACHER_DIR = "teachers"


def pinned_path(run_dir: Path, teacher: str) -> Path:
    """Where the run keeps its copy of the teacher named ``teacher`` (as written in the config)."""
    return Path(run_dir) / TEACHER_DIR / f"{hashlib.sha256(teacher.encode()).hexdigest()[:16]}.pt"


def resolve_teachers(cfg: Config, classes: int, run_dir: Path | None = None) -> dict[str, InitSource]:
    """Every distillation teacher of ``cfg``, keyed by ``distill.teacher`` as written, loaded and checked.

    ``run_dir``: the run a resume continues; a teacher it already pinned is taken from there.

    Raises:
        ConfigError: naming ``phases.N.distill.teacher`` (not found, damaged, decomposed, a different
            model) and why.
    """
    out: dict[str, InitSource] = {}
    for i, phase in enumerate(cfg.phases):
        d = phase.distill
        if d is None:
            continue
        key, model = f"phases.{i}.distill.teacher", d.model or cfg.model.name
        pinned = pinned_path(run_dir, d.teacher) if run_dir is not None else None
        if d.teacher in out:
            source = out[d.teacher]
        elif pinned is not None and pinned.is_file():
            source = resolve_path(d.teacher, pinned)
        else:
            spec = cfg.model.init if d.teacher == "init" else d.teacher
            source = resolve_dense(cfg, spec or "", model, classes, key)
        try:  # again for a teacher shared by phases, or pinned: it must fit this phase's teacher model
            check_compatible(build_model(model, classes), load_state(source), source.describe())
        except InitError as e:
            raise ConfigError(f"{key}{str(e)[len('model.init'):]}") from None
        out[d.teacher] = source
    for teacher, source in out.items():
        print(f"distill: teacher {teacher!r}: {source.describe()}", flush=True)
    return out


def pin_teachers(teachers: dict[str, InitSource], run_dir: Path,
                 tracker: tracking.Tracker | None = None) -> dict[str, InitSource]:
    """Copy every teacher not yet pinned into ``run_dir/teachers/`` and return the pinned sources.

    The original source is recorded as ``tdcompress.teacher.*`` tags on ``tracker`` (the parent run) when it
    is first pinned; with several teachers each gets its key's file stem in the tag (``tdcompress.teacher.<stem>.*``).
    """
    out: dict[str, InitSource] = {}
    for teacher, source in teachers.items():
        path = pinned_path(run_dir, teacher)
        if Path(source.file) != path.resolve():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:
                torch.save(load_state(source), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            if tracker is not None:
                prefix = "tdcompress.teacher." if len(teachers) == 1 else f"tdcompress.teacher.{path.stem}."
                tracker.tags({prefix + k.removeprefix("tdcompress.init."): v for k, v in source.tags().items()})
        out[teacher] = resolve_path(teacher, path)
    return out
