"""Ray's own CLI against `tdcompress cluster up` (the session's cluster, tests/conftest.py), and a job whose driver
dies and is resumed (tests that need no cluster: tests/test_cluster_checks.py).

Marked ray + slow: `ray job submit` exactly as README.md documents it, through each pitfall
a user met (token auth, the job's PATH, TDC_* in the job's runtime env, "auto" with other Ray instances on
the machine, relative paths in Ray's working-dir cache), worker lines once in a job's log, and a job whose
driver is killed mid-ADMM continued by `tdcompress submit --resume RUN`, and, while that job trains, every listener
of the cluster on its address only. Every process the cluster starts is stopped by the fixture, by the pids its
state file records.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CLUSTER_TINY, cmdline, is_loopback, listeners, pids_naming, process_tree, wait_for_path

from cluster import jobs
from launcher.cli import main
from trainer.checkpoints import files as ckpt

PROJECT = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart.yaml"
PROGRESS = "[pretrain] epoch 1/1 step 1/3 "  # a line rank 0 prints once


# ---------------------------------------------------------------- the session's cluster (conftest.ray_cluster)

@pytest.fixture
def cluster(ray_cluster):
    return ray_cluster


def _ray_job_submit(cluster, env: dict[str, str], cifar_root: Path, *overrides: str) -> subprocess.CompletedProcess:
    """README's command: `ray job submit --address URL --working-dir . --runtime-env-json ... -- tdcompress run ...`,
    run from the project directory by Ray's own CLI (it follows the job and exits with its outcome)."""
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [ray, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", ".",
           "--runtime-env-json", json.dumps({"env_vars": {"TDC_DATA_ROOT": str(cifar_root)}}), "--",
           "tdcompress", "run", CONFIG, *CLUSTER_TINY, "cluster.address=auto", *overrides]
    return subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_submit_as_documented(cluster, tmp_path, cifar_root):
    # The shell a user types in: no venv on PATH (the job's shell gets the nodes' PATH), no Ray or MLflow settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "TDC_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if Path(p).resolve() != Path(sys.executable).parent.resolve())
    runs = tmp_path / "runs"
    ok = [f"cluster.storage={runs}", "cluster.shared_storage=true", f"tracking.uri={cluster.mlflow_uri}",
          "run_name=raycli"]

    # Token authentication is on: without the token Ray's CLI refuses, and says what to set.
    r = _ray_job_submit(cluster, env, cifar_root, *ok)
    assert r.returncode != 0 and "RAY_AUTH_TOKEN" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]

    env.update(cluster.auth_env())
    r = _ray_job_submit(cluster, env, cifar_root, *ok)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "succeeded" in out, out[-4000:]
    job = re.search(r"Job '(raysubmit_\w+)' submitted", out).group(1)
    # "auto" is this job's cluster although other Ray instances run on the machine, and Ray Train's own
    # actors found it too.
    assert f"Connecting to existing Ray cluster at address: {cluster.gcs_address}" in out
    assert "Found multiple active Ray instances" not in out
    # Each worker line once, in Ray's follow output and in `tdcompress jobs logs`.
    assert out.count(PROGRESS) == 1, out[-4000:]
    logs = subprocess.run([sys.executable, "-m", "launcher.cli", "jobs", "logs", job, "--state-dir", cluster.dir],
                          cwd=PROJECT, env=env, capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0 and logs.stdout.count(PROGRESS) == 1, logs.stdout[-3000:] + logs.stderr[-2000:]

    # The run is where the command said (not in Ray's working-dir cache), its two workers on two nodes,
    # and its MLflow records on the cluster's tracking server.
    run_dir = runs / "quickstart" / "raycli"
    last = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert last is not None
    assert ckpt.load_rank(last, 0)["node"] != ckpt.load_rank(last, 1)["node"]
    cached = list(Path(cluster.temp_dir).glob("session_*/runtime_resources/working_dir_files/*/runs"))
    assert not cached, cached
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster.mlflow_uri)
    exp = client.get_experiment_by_name("tdcompress")
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "raycli"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"

    # Every server of the cluster (GCS, raylets, agents, dashboard, workers, MLflow) listens on loopback only.
    listening = listeners(_cluster_processes(cluster))
    assert listening, "found no listener of the cluster: the check would pass vacuously"
    public = [f for f in listening if not is_loopback(f[0])]
    assert not public, f"listening beyond loopback: {public}"

    # A relative cluster.storage would land in Ray's cache: the driver refuses it, saying what to pass.
    r = _ray_job_submit(cluster, env, cifar_root, "cluster.storage=runs", "cluster.shared_storage=true",
                        "tracking.enabled=false", "run_name=relative")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "cluster.storage: 'runs' resolves inside the copy of the project" in out, out[-3000:]
    assert "Traceback" not in out


def _submit(cluster, capsys, *args: str) -> tuple[int, str, str]:
    code = main(["submit", CONFIG, *CLUSTER_TINY, *args, "--state-dir", cluster.dir])
    out, err = capsys.readouterr()
    job = next((line.split()[1] for line in out.splitlines() if line.startswith("job ")), "")
    return code, job, out + err


def _status(target, job_id: str) -> str:
    status = jobs.status(target, job_id).status
    return getattr(status, "value", status)


def _follow(target, job_id: str, on_chunk=None) -> str:
    log = ""
    for chunk in jobs.follow(target, job_id):
        log += chunk
        if on_chunk:
            on_chunk(log)
    deadline = time.monotonic() + 300  # the job's end is a state the job server reaches after the log ends
    while _status(target, job_id) in ("PENDING", "RUNNING") and time.monotonic() < deadline:
        time.sleep(1)
    return log


def _cluster_processes(cluster) -> set[int]:
    """Every process of the cluster now: its nodes' Ray processes (raylets, GCS, agents, dashboard), what they
    started (job drivers, Ray Train workers) and its MLflow server."""
    return {p for pid in pids_naming((cluster.dir, cluster.temp_dir)) for p in process_tree(pid)}


@pytest.mark.ray
@pytest.mark.slow
def test_driver_killed_then_submit_resume_continues(cluster, tmp_path, cifar_root, monkeypatch, capsys):
    """SIGKILL the job's driver mid-ADMM (after a checkpoint that is not the phase's last): the job fails, its
    workers go with it; `tdcompress submit --resume RUN` continues from that checkpoint (not from the start) and
    finishes. While the job trains, every process of the cluster, rank 0's included, listens on the cluster's
    address (127.0.0.1) only."""
    monkeypatch.setenv("TDC_DATA_ROOT", str(cifar_root))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    target = jobs.resolve_target(None, cluster.dir)
    runs = tmp_path / "runs"
    # 2 ADMM epochs of 4 steps; the run holds after the first one's checkpoint (debug.hold_at) until the driver
    # is killed, so that checkpoint is the newest whatever the host's speed.
    held = ["phases=[{kind: pretrain, epochs: 1, steps_per_epoch: 3}, {kind: admm, epochs: 2, steps_per_epoch: 4},"
            " {kind: evaluate}]", "debug.hold_at={phase: 1, epoch: 1}"]
    code, job, text = _submit(cluster, capsys, *held, f"cluster.storage={runs}", "run_name=driver")
    assert code == 0, text
    run_dir = runs / "quickstart" / "driver"
    wait_for_path(run_dir / "held-1-1", lambda: _status(target, job) in ("PENDING", "RUNNING"), what=f"job {job}")
    before = ckpt.read_meta(ckpt.latest_checkpoint(run_dir / "checkpoints"))
    assert (before["phase"], before["epoch"], before["phase_done"]) == ("admm", 1, False), before

    # Training is under way on both nodes: the cluster's listeners, sampled now, include rank 0's rendezvous.
    procs = _cluster_processes(cluster)
    workers = {p for p in procs if cmdline(p).startswith("ray::RayTrainWorker")}
    assert len(workers) == 2, [cmdline(p) for p in procs]
    found = listeners(procs)
    assert any(pid in workers for _, _, pid, _ in found), found
    elsewhere = [f for f in found if not is_loopback(f[0])]
    assert not elsewhere, f"listening beyond the cluster's address 127.0.0.1: {elsewhere}"

    pid = int(jobs.status(target, job).driver_info.pid)
    os.kill(pid, signal.SIGKILL)
    log = _follow(target, job)
    assert _status(target, job) == "FAILED", log[-3000:]
    after = ckpt.read_meta(ckpt.latest_checkpoint(run_dir / "checkpoints"))
    assert after == before, "the run moved on after its driver was killed"

    code, job2, text = _submit(cluster, capsys, *held, f"cluster.storage={runs}", "--resume", "driver")
    assert code == 0 and "run_name=driver" in text and "resume=true" in text, text
    log2 = _follow(target, job2)
    assert _status(target, job2) == "SUCCEEDED", log2[-3000:]
    # Resumed, not restarted: from the ADMM checkpoint, no pretrain again, no second hold, every Z-update once.
    assert re.search(r"\[resume\] from \S+ \(phase 1 'admm', epoch 1,", log2), log2[-3000:]
    assert "== phase 1/3: pretrain ==" not in log2 and "[pretrain] epoch" not in log2
    final = [p for p in sorted((run_dir / "checkpoints").glob("ckpt-*")) if p.is_dir()
             and ckpt.read_meta(p)["phase"] == "admm"][-1]
    assert ckpt.read_meta(final)["phase_done"]
    assert ckpt.load_rank(final, 0)["admm"]["updates"] == 4  # 8 steps, one Z-update per 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster.mlflow_uri)
    exp = client.get_experiment_by_name("tdcompress")
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "driver"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED", [r.info.status for r in parent]
