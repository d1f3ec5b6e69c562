"""The issue-14 study: ResNet-20 on the full CIFAR-10, ADMM vs direct decomposition, branched from one dense model per seed.

Runs the rows in order, each as one ``tdcompress run`` (printed first, verbatim, for RESULTS.md):

    dense-r20-s{0,1}              configs/study/dense_resnet20.yaml: 15 epochs of dense training
    r20-<fmt>-<k>x-admm-s<seed>   configs/study/admm_r20.yaml: ADMM 3 epochs + decompose + fine-tune 2
    r20-<fmt>-<k>x-direct-s<seed> configs/study/direct_r20.yaml: decompose + fine-tune 5 (same ranks)
    r20-rankprune-3x-s0           configs/study/rankprune_r20.yaml: rank_prune 3 epochs + fine-tune 2
    r20-lrs-3x-features-s0        direct_r20.yaml, low-rank + sparse fitted to feature maps, fine-tune 5
    r20-tucker2-3x-admm-ftlr002-s0  the tucker2 3x ADMM row, fine-tuned at lr 0.002 instead of 0.01
    r20-tucker2-3x-{admm,direct}10-s0  the tucker2 3x pair at a 10-epoch budget (ADMM 8 + 2 vs fine-tune 10)
    r20-tucker2-3x-features-s0    direct_r20.yaml with the data-aware (feature) fit

Every compressed row starts from its seed's dense model (``model.init`` = that run's directory), so
each pair shares its dense baseline (logged as ``init_top1`` on the compressed run). Every run goes
to ``<study-dir>/runs`` and the MLflow store ``<study-dir>/mlruns.db``. A row whose run is finished
is skipped; one that exists unfinished is resumed (``resume=true``); one that another process is
running right now (e.g. the background script of the dense rows) is waited for, never started twice.

    python bench/study.py --dry-run              # every row's status and exact command
    python bench/study.py                        # run what is left, in order (hours: background it)
    python bench/study.py --only r20-svd-3x-admm-s0 --only r20-svd-3x-direct-s0
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from trainer import checkpoint as ckpt  # noqa: E402

DENSE_CONFIG = "configs/study/dense_resnet20.yaml"
DENSE_EXPERIMENT = "study-dense-r20"  # the `name` of DENSE_CONFIG: runs live in runs/<name>/<run_name>
DENSE_SCRIPT = "run_dense.sh"  # the lead's background script of the dense rows: while it lives, it owns them
POLL_S = 60


@dataclass(frozen=True)
class Row:
    """One run of the study: its run name, config, seed, extra overrides, and the dense run it branches from."""

    name: str
    config: str
    seed: int
    overrides: tuple[str, ...] = ()
    parent: str | None = None  # run name of the dense row this one starts from

    @property
    def experiment(self) -> str:
        return yaml.safe_load((REPO / self.config).read_text())["name"]


def _pair(fmt: str, keep: float, label: str, seed: int) -> list[Row]:
    over = (f"compression.format={fmt}", f"compression.keep_ratio={keep}")
    dense = f"dense-r20-s{seed}"
    return [Row(f"r20-{fmt}-{label}-{kind}-s{seed}", f"configs/study/{kind}_r20.yaml", seed, over, dense)
            for kind in ("admm", "direct")]


# In priority order: the tucker2 3x pair on both seeds first, tt last (its layout issue landed last).
ROWS: list[Row] = [
    Row("dense-r20-s0", DENSE_CONFIG, 0),
    Row("dense-r20-s1", DENSE_CONFIG, 1),
    *_pair("tucker2", 0.33, "3x", 0),
    *_pair("tucker2", 0.33, "3x", 1),
    *_pair("svd", 0.33, "3x", 0),
    *_pair("tucker2", 0.5, "2x", 0),
    *_pair("tt", 0.33, "3x", 0),
    # The two data-aware methods (rank_prune, feature fit), same protocol (5 epochs from the dense model, ~3x fewer conv parameters).
    Row("r20-rankprune-3x-s0", "configs/study/rankprune_r20.yaml", 0, (), "dense-r20-s0"),
    Row("r20-lrs-3x-features-s0", "configs/study/direct_r20.yaml", 0,
        ("compression.format=lowrank_sparse", "compression.keep_ratio=0.33", "decompose.fit=features"), "dense-r20-s0"),
    # Is the fine-tuning restart what costs the ADMM rows? Right after ADMM the decomposition loses nothing, then
    # fine-tuning at lr 0.01 drops ~1.5 points before it recovers: the same row, fine-tuned at lr 0.002.
    Row("r20-tucker2-3x-admm-ftlr002-s0", "configs/study/admm_r20.yaml", 0,
        ("compression.format=tucker2", "compression.keep_ratio=0.33", "phases.2.lr=0.002"), "dense-r20-s0"),
    # Does the ADMM/direct gap close with a longer budget? The tucker2 3x pair at 10 epochs (ADMM 8 + fine-tune 2).
    Row("r20-tucker2-3x-admm10-s0", "configs/study/admm_r20.yaml", 0,
        ("compression.format=tucker2", "compression.keep_ratio=0.33", "phases.0.epochs=8"), "dense-r20-s0"),
    Row("r20-tucker2-3x-direct10-s0", "configs/study/direct_r20.yaml", 0,
        ("compression.format=tucker2", "compression.keep_ratio=0.33", "phases.1.epochs=10"), "dense-r20-s0"),
    # The data-aware fit for the direct ablation: does a better start change the direct row?
    Row("r20-tucker2-3x-features-s0", "configs/study/direct_r20.yaml", 0,
        ("compression.format=tucker2", "compression.keep_ratio=0.33", "decompose.fit=features"), "dense-r20-s0"),
]


def run_dir(study: Path, row: Row) -> Path:
    return study / "runs" / row.experiment / row.name


def finished(path: Path) -> bool:
    """The run's newest checkpoint closes its last phase (or the dense script marked it DONE)."""
    if (path / "DONE").is_file():
        return True
    last = ckpt.latest_checkpoint(path / "checkpoints")
    if last is None or not (path / "config.yaml").is_file():
        return False
    meta = ckpt.read_meta(last)
    phases = yaml.safe_load((path / "config.yaml").read_text())["phases"]
    return meta["phase_done"] and meta["phase_index"] == len(phases) - 1


def _live_commands() -> dict[int, list[str]]:
    """argv of every live process but this one (from /proc; Linux)."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(proc.name) != os.getpid():
            out[int(proc.name)] = [a.decode(errors="replace") for a in argv]
    return out


def _is_run(words: list[str]) -> bool:
    return any(w.endswith("tdcompress") for w in words[:3]) and "run" in words


def blocker(study: Path, row: Row) -> str | None:
    """Why ``row`` must not start now, or None: another process runs it (or the dense script owns it),
    or another run of this study is going (two embedded Rays would only share the same cores)."""
    storage = f"cluster.storage={study / 'runs'}"
    for pid, words in _live_commands().items():
        if _is_run(words) and f"run_name={row.name}" in words:
            return f"running in process {pid}"
        if row.config == DENSE_CONFIG and any(w.endswith(DENSE_SCRIPT) for w in words[:3]):
            return f"the dense script ({DENSE_SCRIPT}, process {pid}) runs the dense rows"
        if _is_run(words) and storage in words:
            return f"another study run is going (process {pid})"
    return None


def command(study: Path, row: Row, resume: bool) -> list[str]:
    """The exact `tdcompress run` command of ``row`` (``resume=true`` appended when continuing it)."""
    cmd = ["tdcompress", "run", row.config, f"run_name={row.name}", f"seed={row.seed}",
           f"cluster.storage={study / 'runs'}", f"tracking.uri=sqlite:///{study / 'mlruns.db'}", *row.overrides]
    if row.parent:
        cmd.append(f"model.init={run_dir(study, Row(row.parent, DENSE_CONFIG, row.seed))}")
    return cmd + (["resume=true"] if resume else [])


def status(study: Path, row: Row) -> str:
    path = run_dir(study, row)
    if finished(path):
        return "finished"
    if blocker(study, row):
        return "waiting"
    return "partial" if path.exists() else "new"


def run_row(study: Path, row: Row, nice: int) -> bool:
    """Run (or resume) ``row`` to the end, once nothing else runs it or the study. True when it finished."""
    said = None
    while not finished(run_dir(study, row)) and (why := blocker(study, row)):
        if why != said:
            print(f"[study] {row.name}: waiting: {why}", flush=True)
            said = why
        time.sleep(POLL_S)
    path = run_dir(study, row)
    if finished(path):
        print(f"[study] {row.name}: finished ({path})", flush=True)
        return True
    if row.parent and not finished(run_dir(study, Row(row.parent, DENSE_CONFIG, row.seed))):
        print(f"[study] {row.name}: skipped, its dense run {row.parent} is not finished", flush=True)
        return False
    cmd = command(study, row, resume=path.exists())
    print(f"[study] {row.name}: {shlex.join(cmd)}", flush=True)
    exe = Path(sys.executable).with_name("tdcompress")
    full = (["nice", "-n", str(nice)] if nice else []) + [str(exe) if exe.is_file() else "tdcompress", *cmd[1:]]
    t0 = time.time()
    rc = subprocess.call(full, cwd=REPO)
    print(f"[study] {row.name}: exit {rc} after {(time.time() - t0) / 60:.1f} min", flush=True)
    return rc == 0 and finished(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study-dir", type=Path, default=Path("/work/study"), help="runs/ and mlruns.db go here")
    p.add_argument("--only", action="append", default=[], metavar="ROW", help="run only this row (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print every row's status and command, run nothing")
    p.add_argument("--nice", type=int, default=19, help="niceness of the runs (0: none)")
    args = p.parse_args(argv)
    study = args.study_dir.resolve()
    names = [r.name for r in ROWS]
    unknown = [n for n in args.only if n not in names]
    if unknown:
        p.error(f"--only: unknown row(s) {', '.join(unknown)}; rows: {', '.join(names)}")
    rows = [r for r in ROWS if not args.only or r.name in args.only]
    if not os.environ.get("TDC_DATA_ROOT"):
        os.environ["TDC_DATA_ROOT"] = str(REPO.parent / "shared" / "data" / "cifar10")
    print(f"[study] {len(rows)} rows, study dir {study}, data {os.environ['TDC_DATA_ROOT']}", flush=True)
    if args.dry_run:
        for row in rows:
            path = run_dir(study, row)
            print(f"{row.name:28s} {status(study, row):9s} {shlex.join(command(study, row, path.exists()))}")
        return 0
    failed = [row.name for row in rows if not run_row(study, row, args.nice)]
    print(f"[study] done; not finished: {', '.join(failed) or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
