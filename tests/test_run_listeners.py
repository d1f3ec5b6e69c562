"""An embedded 2-worker run, as a user starts it (`python -m launcher.cli run`), sampled WHILE it trains.

The run holds after its first checkpoint (``debug.hold_at``): every worker is alive with its process
group up. Then every socket the run's whole process tree listens on (driver, GCS, raylet, agents,
dashboard, both Ray Train workers, rank 0's rendezvous store) must be on loopback, and the run's
output must not carry Ray's noise a user reads as failure. The run starts while another Ray holds
8265 (another local run, a study): its dashboard moves to a free port and says where, its Prometheus
endpoints do not collide, and its workers know their own GCS.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import cmdline, is_loopback, listeners, process_tree, wait_for_path

from cluster import ray_runtime
from trainer.checkpoints import files as ckpt

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parents[1]
TINY = ["model.name=tinycnn", "data.train_subset=512", "data.eval_subset=256", "data.batch_size=64",
        "data.eval_batch_size=128", "log_every=1", "cluster.num_workers=2", "tracking.log_model=false",
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
    held = socket.socket()  # 8265 taken, as another Ray on the machine would hold it
    if ray_runtime._port_free(ray_runtime.DASHBOARD_PORT):
        held.bind(("127.0.0.1", ray_runtime.DASHBOARD_PORT))
        held.listen()
    run_dir = runs / "quickstart" / "listen"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True)
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

        # Beside the Ray that holds 8265: the dashboard elsewhere, said so, and answering there (401: Ray's token
        # authentication is on); the workers' RAY_ADDRESS is this Ray's GCS, not whichever "auto" finds first.
        url = re.search(rf"embedded Ray: dashboard at (\S+) \({ray_runtime.DASHBOARD_PORT} is in use",
                        log.read_text()).group(1)
        assert not url.endswith(f":{ray_runtime.DASHBOARD_PORT}")
        try:
            urllib.request.urlopen(url + "/api/version", timeout=30).close()
        except urllib.error.HTTPError as e:
            assert e.code == 401, e
        gcs = next(cmdline(p) for p in tree if "gcs_server" in cmdline(p).split(" ")[0])
        gcs_port = re.search(r"--gcs_server_port=(\d+)", gcs).group(1)
        for pid in workers:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert f"RAY_ADDRESS=127.0.0.1:{gcs_port}".encode() in environ, pid
        logs = Path(re.search(r"--log_dir=(\S+)", gcs).group(1))
        for name in ("dashboard.log", "monitor.log"):  # their metrics servers bound (44227 / 44217 may be taken)
            text = (logs / name).read_text()
            assert "metrics server" in text and "Address already in use" not in text, (name, text[-2000:])

        (run_dir / "release-0-1").touch()
        proc.wait(timeout=600)
    finally:
        held.close()
        if proc.poll() is None:  # a check failed while the run held: release it so it ends (and its Ray with it)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "release-0-1").touch()
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    assert "== phase 2/2: evaluate ==" in out, out[-3000:]
    noisy = [line for line in out.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, noisy
    assert out.count(TOKEN_NOTE) == 1 and (tmp_path / ".ray" / "auth_token").is_file(), out[-3000:]

