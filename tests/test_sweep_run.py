"""A tiny sweep end to end (tinycnn on a CIFAR-10 subset, cluster.backend=local): a dense row and a grid of two rows
run, the dense row, failing once, is run again from its checkpoint, the sweep is stopped while a row is mid-run,
resumes (the finished row skipped, the partial row resumed from its checkpoints, the new row run), and its table
regenerates from the
exported records with the MLflow store deleted. The dense row's weights are kept beside the records, and the grid
rows start from that file."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import empty_mlflow_db, wait_for_path

from launcher.cli import main
from trainer.checkpoints import files as ckpt
from trainer.init_weights import load_state, resolve_path
from trainer.tracking import tracker as tracking

REPO = Path(__file__).resolve().parents[1]
FINETUNE = "phases=[{{kind: decompose}}, {{kind: finetune, epochs: {e}, steps_per_epoch: 2}}, {{kind: evaluate}}]"
LONG_EPOCHS = 3  # the row stopped mid-run: it holds after its first fine-tune epoch (HOLD) until stopped
# The grid's rows wait once after the checkpoint of their first fine-tune epoch (debug.hold_at): the sweep is
# stopped in that state, not raced; the row resumed later has held already, the other row is released.
HOLD = "debug.hold_at={phase: 1, epoch: 1}"
# The dense row fails once after its first epoch's checkpoint (exit 1); the sweep runs it again, resumed.
FAIL_ONCE = "debug.fail_at={phase: 0, epoch: 1}"


def _write(tmp_path: Path) -> Path:
    base = {"name": "tiny", "log_every": 2, "model": {"name": "tinycnn"},
            "data": {"dataset": "packed", "batch_size": 64, "train_subset": 512, "eval_subset": 256,
                     "eval_batch_size": 128},
            "optim": {"lr": 0.05}, "cluster": {"backend": "local", "num_workers": 1},
            "tracking": {"system_metrics": False, "log_model": False},
            "phases": [{"kind": "pretrain", "epochs": 2, "steps_per_epoch": 4}, {"kind": "evaluate"}]}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"name": "tiny-sweep", "storage": "runs", "tracking_uri": "sqlite:///mlruns.db", "records": "records",
             "dense": {"name": "dense-s{seed}", "config": "base.yaml", "seeds": [0], "weights": "parents/{name}",
                       "overrides": [FAIL_ONCE]},
             "grids": [{"name": "{format}-{budget}-s{seed}", "config": "base.yaml", "axes": {
                 "format": ["svd", "tucker2"], "budget": {"long": [FINETUNE.format(e=LONG_EPOCHS), HOLD]}}}]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    empty_mlflow_db(tmp_path / "mlruns.db")
    return tmp_path / "sweep.yaml"


def _sweep(tmp_path: Path, cifar_root: Path, log: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TDC_DATA_ROOT": str(cifar_root), "DS_ACCELERATOR": "cpu"}
    out = open(tmp_path / log, "w")
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", "sweep", "sweep.yaml"], cwd=tmp_path, env=env,
                            stdout=out, stderr=subprocess.STDOUT)


def _mid_finetune(run_dir: Path) -> bool:
    """The row has a checkpoint inside its finetune phase (phase 1, an epoch done, the phase not)."""
    last = ckpt.latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    if last is None:
        return False
    meta = ckpt.read_meta(last)
    return meta["phase_index"] == 1 and meta["epoch"] >= 1 and not meta["phase_done"]


def _release(run_dir: Path, proc: subprocess.Popen) -> None:
    """Let ``run_dir``'s row go on when it holds (its held file appears); returns at once if the sweep ends."""
    held = run_dir / "held-1-1"
    while not held.exists() and proc.poll() is None:
        time.sleep(0.2)
    if held.exists():
        (run_dir / "release-1-1").touch()


@pytest.mark.slow
def test_sweep_interrupted_resumes_and_tables_come_from_records(tmp_path, cifar_root, monkeypatch, capsys):
    _write(tmp_path)
    runs = tmp_path / "runs" / "tiny"
    proc = _sweep(tmp_path, cifar_root, "first.log")
    wait_for_path(runs / "svd-long-s0" / "held-1-1", lambda: proc.poll() is None,
                  what=f"the sweep (output: {tmp_path / 'first.log'})")
    assert _mid_finetune(runs / "svd-long-s0")
    proc.send_signal(signal.SIGTERM)  # the sweep stops its running row the same way, then itself
    assert proc.wait(timeout=300) == 130, (tmp_path / "first.log").read_text()[-3000:]

    assert sorted(p.name for p in (tmp_path / "records").glob("*.json")) == ["dense-s0.json"]
    # The dense weights are kept beside the records (dense.weights), as trained, and the grid rows start from them.
    kept = tmp_path / "parents" / "dense-s0" / "model.safetensors"
    trained, copy = (load_state(resolve_path("x", p)) for p in (runs / "dense-s0", kept))
    assert trained.keys() == copy.keys() and all(torch.equal(trained[k], copy[k]) for k in trained)
    first = (tmp_path / "first.log").read_text()
    started = [line for line in first.splitlines() if ": starting: " in line]
    assert len(started) == 2 and f"model.init={kept}" in started[1], started
    # The dense row failed once (exit 1) and ran again from its checkpoint, to the end: its record, its weights.
    assert "[sweep] dense-s0: exit 1 " in first and "injected failure" in first, first[-3000:]
    retry = next(line for line in first.splitlines() if line.startswith("[sweep] dense-s0: retry 1/2, resuming:"))
    assert retry.endswith("resume=true") and f"[resume] from {runs / 'dense-s0'}" in first
    assert json.loads((tmp_path / "records" / "dense-s0.json").read_text())["status"] == "FINISHED"
    cut = json.loads((runs / "svd-long-s0" / "run.json").read_text())
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert tracking.client(uri).get_run(cut["parent_id"]).info.status == "KILLED"
    cut_ckpt = ckpt.latest_checkpoint(runs / "svd-long-s0" / "checkpoints")
    done_before = sorted(p.name for p in (runs / "dense-s0" / "checkpoints").iterdir())
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "sweep.yaml", "--dry-run"]) == 0
    status = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert status == {"dense-s0": "finished", "svd-long-s0": "partial", "tucker2-long-s0": "new"}

    proc = _sweep(tmp_path, cifar_root, "second.log")
    _release(runs / "tucker2-long-s0", proc)
    assert proc.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    assert "[sweep] dense-s0: finished, skipped" in log
    resumed = next(line for line in log.splitlines() if line.startswith("[sweep] svd-long-s0: resuming:"))
    assert resumed.endswith("resume=true")
    assert sorted(p.name for p in (runs / "dense-s0" / "checkpoints").iterdir()) == done_before  # not run again
    assert f"[resume] from {cut_ckpt} " in log  # the row continued from the checkpoint it had when it was stopped
    rec = json.loads((tmp_path / "records" / "svd-long-s0.json").read_text())
    assert rec["run_id"] == cut["parent_id"] and rec["status"] == "FINISHED"  # the same MLflow run, continued
    finetune = next(p for p in rec["phases"] if p["kind"] == "finetune")
    # Every epoch once (the phase logs epochs 1..N at its epoch ends), steps rising across the stop and resume.
    assert [int(v) for _, v in finetune["history"]["epoch"]] == list(range(1, LONG_EPOCHS + 1))
    steps = [s for s, _ in finetune["history"]["epoch"]]
    assert steps == sorted(set(steps))

    args = ["compare", "--format", "markdown", "--plot", "", "--filter", "tags.`tdcompress.sweep` = 'tiny-sweep'"]
    assert main([*args, "--tracking-uri", uri]) == 0
    from_store = capsys.readouterr().out
    (tmp_path / "mlruns.db").unlink()  # no store: the table comes from the records alone
    assert main([*args, "--records", "records"]) == 0
    table = capsys.readouterr().out
    assert table == from_store
    assert len(table.splitlines()) == 2 + 3 and all(f"| {n} |" in table for n in status)
