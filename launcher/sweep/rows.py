"""A sweep row as a `tdcompress run`: its exact command, its run directory and where it stands.

A row's status comes from its run directory (the checkpoints are the truth, as for ``resume=true``):
``finished`` when the newest intact checkpoint closes the last phase; ``running`` when another process on
this machine runs it now (a `tdcompress run ... run_name=ROW`, e.g. started by hand before the sweep: it is
waited for, never driven twice); ``partial`` when the directory exists (interrupted, failed, or killed: it
is resumed); ``recorded`` when there is no run directory but the row's record is in the sweep's records
directory (and, for a dense row, its kept weights: ``dense.weights``), so it ran on another machine and is not
run again; ``waiting`` when its dense row is neither finished nor kept; else ``new``.
"""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from launcher.config import load_config
from launcher.schema import Config
from launcher.sweep.spec import Row, Sweep
from trainer.checkpoints import files as ckpt
from trainer.export.torch_export import WEIGHTS

SWEEP_TAG = "tdcompress.sweep"


@dataclass(frozen=True)
class Where:
    """Resolved, absolute places shared by every row of one sweep."""

    storage: Path
    tracking_uri: str
    records: Path | None


def where(sweep: Sweep) -> Where:
    from trainer.tracking.tracker import resolve_tracking_uri

    return Where(storage=Path(sweep.storage).expanduser().resolve(),
                 tracking_uri=resolve_tracking_uri(sweep.tracking_uri),
                 records=Path(sweep.records).resolve() if sweep.records else None)


def weights_file(row: Row) -> Path | None:
    """Where a dense row's trained weights are kept (``dense.weights``), absolute; None when not kept."""
    return Path(row.weights).resolve() / WEIGHTS if row.weights else None


def parent_of(sweep: Sweep, row: Row) -> Row | None:
    return next(r for r in sweep.rows if r.name == row.parent) if row.parent else None


def _overrides(sweep: Sweep, at: Where, row: Row, run_dirs: dict[str, Path]) -> list[str]:
    over = [f"run_name={row.name}", f"seed={row.seed}", *row.overrides, f"cluster.storage={at.storage}",
            f"tracking.uri={at.tracking_uri}", f"tracking.tags={{{SWEEP_TAG}: {sweep.name}}}"]
    if parent := parent_of(sweep, row):
        # Kept weights outlive the run directory (they are committed beside the records): start from them.
        over.append(f"model.init={weights_file(parent) or run_dirs[parent.name]}")
    return over


def command(sweep: Sweep, at: Where, row: Row, run_dirs: dict[str, Path], resume: bool) -> list[str]:
    """The `tdcompress run` command of ``row`` (``resume=true`` appended when its run directory exists)."""
    return ["tdcompress", "run", row.config, *_overrides(sweep, at, row, run_dirs), *(["resume=true"] if resume
                                                                                       else [])]


def configs(sweep: Sweep, at: Where) -> tuple[dict[str, Config], dict[str, Path]]:
    """Every row's validated config and run directory (``<storage>/<config name>/<row name>``), dense rows
    first so the others can point at them. Raises ConfigError naming the row and the key."""
    from launcher.schema import ConfigError

    cfgs: dict[str, Config] = {}
    dirs: dict[str, Path] = {}
    for row in sweep.rows:
        try:
            cfg = load_config(row.config, _overrides(sweep, at, row, dirs))
        except ConfigError as e:
            raise ConfigError(f"row {row.name} ({row.config}): {e}") from None
        cfgs[row.name] = cfg
        dirs[row.name] = Path(cfg.cluster.storage).resolve() / cfg.name / row.name  # as the run resolves it
    return cfgs, dirs


def finished(run_dir: Path, cfg: Config) -> bool:
    """The run's newest intact checkpoint closes its last phase."""
    last = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if last is None:
        return False
    meta = ckpt.read_meta(last)
    return bool(meta["phase_done"]) and meta["phase_index"] == len(cfg.phases) - 1


def running_elsewhere(row: Row) -> int | None:
    """The pid of another live process here whose command runs ``row`` (``run`` ... ``run_name=ROW``), or None.

    Read from /proc (Linux); elsewhere nothing is found and the run directory alone decides.
    """
    mine = {os.getpid(), os.getppid()}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if int(proc.name) not in mine and "run" in argv and f"run_name={row.name}" in argv:
            return int(proc.name)
    return None


def kept(row: Row) -> bool:
    """A dense row whose trained weights are kept (``dense.weights``) and written."""
    file = weights_file(row)
    return file is not None and file.is_file()


def recorded(at: Where, row: Row, dirs: dict[str, Path]) -> bool:
    """No run directory here, but the row's record (and a dense row's kept weights) is: it ran elsewhere."""
    return (at.records is not None and (at.records / f"{row.name}.json").is_file() and not dirs[row.name].exists()
            and (not row.dense or kept(row)))


def parent_ready(sweep: Sweep, row: Row, cfgs: dict[str, Config], dirs: dict[str, Path]) -> bool:
    """``row`` has no dense row, or its dense row finished here or has its weights kept."""
    parent = parent_of(sweep, row)
    return parent is None or kept(parent) or finished(dirs[parent.name], cfgs[parent.name])


def keep_weights(row: Row, run_dir: Path) -> Path:
    """Write a finished dense row's weights into its ``dense.weights`` directory; returns the file."""
    from trainer.export.torch_export import export_run

    # The dense model as trained (BN not folded): the state the grid rows' model.init loads and checks.
    return export_run(run_dir, weights_file(row).parent, fold_bn=False) / WEIGHTS


def status(sweep: Sweep, at: Where, row: Row, cfgs: dict[str, Config], dirs: dict[str, Path]) -> str:
    """finished, running (by another process), partial, recorded (ran elsewhere), waiting (its dense row is
    neither finished nor kept) or new."""
    if finished(dirs[row.name], cfgs[row.name]):
        return "finished"
    if running_elsewhere(row):
        return "running"
    if dirs[row.name].exists():
        return "partial"
    if recorded(at, row, dirs):
        return "recorded"
    if not parent_ready(sweep, row, cfgs, dirs):
        return "waiting"
    return "new"


def dry_run_lines(sweep: Sweep, at: Where, only: set[str] | None = None) -> list[str]:
    """One line per row (of ``only``, default all): name, status, exact command (what a run would do now)."""
    cfgs, dirs = configs(sweep, at)
    rows = [r for r in sweep.rows if only is None or r.name in only]
    width = max(len(r.name) for r in rows)
    out = []
    for row in rows:
        st = status(sweep, at, row, cfgs, dirs)
        cmd = command(sweep, at, row, dirs, resume=st == "partial")
        skipped = st in ("finished", "recorded")
        out.append(f"{row.name:{width}s}  {st:8s}  {'(skipped)' if skipped else shlex.join(cmd)}")
    return out
