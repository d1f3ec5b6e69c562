"""An embedded 2-worker run, as a user starts it (`python -m launcher.cli run`), sampled WHILE it trains.

The run holds after its first checkpoint (``debug.hold_at``): every worker is alive with its process
group up. Then every socket the run's whole process tree listens on (driver, GCS, raylet, agents,
dashboard, both Ray Train workers, rank 0's rendezvous store) must be on loopback, and the run's
output must not carry Ray's noise a user reads as failure.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cmdline, is_loopback, listeners, process_tree, wait_for_path

from trainer import checkpoint as ckpt

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[1]
TINY = ["model.name=tinycnn", "data.train_subset=512", "data.eval_subset=256", "data.batch_size=64",
        "data.eval_batch_size=128", "log_every=1", "cluster.num_workers=2",
        "phases=[{kind: pretrain, epochs: 2, steps_per_epoch: 2}, {kind: evaluate}]",
        "debug.hold_at={phase: 0, epoch: 1}"]
# Lines every run printed before the project handled them: Ray's token-auth notices (a WARNING on every start,
# an INFO on the first) and the error line of Ray Train's preemption watcher.
NOISE = ("Token authentication is enabled", "Generated new authentication token", "PreemptionWatcher")
# What the user must know instead, once, when the token is made (a fresh HOME here).
TOKEN_NOTE = "embedded Ray: token authentication on; its token was created in "


def test_embedded_run_listens_on_loopback_only_while_training_and_prints_no_ray_noise(tmp_path, cifar_root):
    runs = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(TDC_DATA_ROOT=str(cifar_root), PYTHONPATH=str(PROJECT), HOME=str(tmp_path))  # a user's fresh HOME
    cmd = [sys.executable, "-m", "launcher.cli", "run", "configs/quickstart.yaml", *TINY,
           f"cluster.storage={runs}", f"tracking.uri=sqlite:///{tmp_path}/mlruns.db", "run_name=listen"]
    log = tmp_path / "output.txt"  # a file, not a pipe: a pipe nobody reads while the test waits could fill
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
    run_dir = runs / "quickstart" / "listen"
    try:
        wait_for_path(run_dir / "held-0-1", lambda: proc.poll() is None, what=f"the run (output: {log})")
        meta = ckpt.read_meta(ckpt.latest_checkpoint(run_dir / "checkpoints"))
        assert meta["phase"] == "pretrain" and meta["epoch"] == 1 and not meta["phase_done"], meta

        tree = process_tree(proc.pid)
        workers = {p for p in tree if cmdline(p).startswith("ray::RayTrainWorker")}
        assert len(workers) == 2, [cmdline(p) for p in tree]
        found = listeners(tree)
        # Rank 0 serves the process group's rendezvous store: a training worker listens, so the sample is
        # taken while training runs (not only Ray's servers before it).
        assert any(pid in workers for _, _, pid, _ in found), found
        public = [f for f in found if not is_loopback(f[0])]
        assert not public, f"listening beyond loopback: {public}"
        (run_dir / "release-0-1").touch()
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "== phase 2/2: evaluate ==" in out, out[-3000:]
    noisy = [line for line in out.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, noisy
    assert out.count(TOKEN_NOTE) == 1 and (tmp_path / ".ray" / "auth_token").is_file(), out[-3000:]

