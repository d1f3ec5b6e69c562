"""`tdcompress cluster up|down`, `submit` and `jobs` against a real Ray cluster of separate `ray start`
processes on 127.0.0.1 (plus its MLflow server), and the checks that refuse a run before anything is submitted.

The cluster is the session's (tests/conftest.py `ray_cluster`): started once for every cluster test and stopped
at the end, by the pids its state file records; the teardown then checks that no process of the cluster is left.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from conftest import CLUSTER_TINY, wait_for_path

from cluster import jobs, local_cluster
from cluster.ray_runtime import _beside_job_env
from cluster.storage import storage_problem, tracking_problem
from launcher.cli import main
from trainer.checkpoints import files as ckpt

CONFIG = "configs/quickstart.yaml"


# ---------------------------------------------------------------- no cluster needed

def test_multi_node_storage_and_tracking_rules():
    assert storage_problem("/data/runs", shared=False, nodes=1) is None
    why = storage_problem("/data/runs", shared=False, nodes=2)
    assert why.startswith("cluster.storage:") and "cluster.shared_storage=true" in why
    assert storage_problem("/nfs/runs", shared=True, nodes=2) is None
    assert "URI" in storage_problem("s3://bucket/runs", shared=True, nodes=1)
    assert tracking_problem("http://mlflow:5000", "/nfs/runs", shared=False, nodes=4) is None
    assert tracking_problem("sqlite:////tmp/m.db", "/nfs/runs", shared=True, nodes=1) is None
    for uri, shared in (("sqlite:////tmp/m.db", True), ("sqlite:////nfs/runs/m.db", False), ("mlruns", True)):
        why = tracking_problem(uri, "/nfs/runs", shared=shared, nodes=2)
        assert why and why.startswith("tracking.uri:") and "MLflow server" in why, (uri, why)
    assert tracking_problem("sqlite:////nfs/runs/m.db", "/nfs/runs", shared=True, nodes=2) is None


def test_driver_env_leaves_the_jobs_variables_to_the_job(monkeypatch):
    env = {"env_vars": {"PYTHONPATH": "/repo", "TDC_DATA_ROOT": "/mine", "DS_ACCELERATOR": "cpu"}}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _beside_job_env(env) == env
    job = {"runtime_env": {"env_vars": {"TDC_DATA_ROOT": "/data", "PYTHONPATH": "x"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert _beside_job_env(env) == {"env_vars": {"DS_ACCELERATOR": "cpu"}}


def test_bad_address_and_no_cluster(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["jobs", "list", "--address", "http://127.0.0.1:1", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:1" in err and "cannot be reached" in err and "Traceback" not in err
    assert main(["submit", CONFIG, "--state-dir", str(tmp_path)]) == 2
    assert "no cluster address" in capsys.readouterr().err
    assert main(["cluster", "down", "--state-dir", str(tmp_path)]) == 0  # nothing up: nothing to do
    assert "no cluster is up" in capsys.readouterr().out


# ---------------------------------------------------------------- the session's cluster

@pytest.fixture
def cluster2(ray_cluster):
    # 3 nodes: the node-failure test kills one holding a worker; the 2 workers restart on the 2 left.
    return ray_cluster


def _submit(state, capsys, *overrides: str) -> tuple[int, str, str]:
    code = main(["submit", CONFIG, *CLUSTER_TINY, *overrides, "--state-dir", state.dir])
    out, err = capsys.readouterr()
    job = next((line.split()[1] for line in out.splitlines() if line.startswith("job ")), "")
    return code, job, out + err


def _wait(target, job_id: str, until: set[str], timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = jobs.status(target, job_id).status
        status = getattr(status, "value", status)
        if status in until:
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} not {until} after {timeout} s")


@pytest.mark.ray
@pytest.mark.slow
def test_cluster_submit_two_nodes_mlflow_and_stop(cluster2, tmp_path, cifar_root, monkeypatch, capsys):
    monkeypatch.setenv("TDC_DATA_ROOT", str(cifar_root))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    target = jobs.resolve_target(None, cluster2.dir)
    assert target.headers, "the cluster's auth token travels with every request"

    # A second `cluster up` on the same state dir refuses and says how to reuse it.
    with pytest.raises(local_cluster.ClusterError, match="already up.*tdcompress submit"):
        local_cluster.up(2, 1, directory=cluster2.dir)

    # Refusals: nothing is submitted, no run directory is created.
    before = len(jobs.list_jobs(target))
    runs = tmp_path / "runs"
    for bad, expect in ((["cluster.shared_storage=false"], "cluster.storage:"),
                        ([f"tracking.uri=sqlite:///{tmp_path}/m.db"], "tracking.uri:"),
                        (["optim.lr=-1"], "optim.lr"), (["no_such_key=1"], "no_such_key")):
        code, job, text = _submit(cluster2, capsys, f"cluster.storage={runs}", *bad)
        assert code == 2 and not job and expect in text and "Traceback" not in text, text
    assert len(jobs.list_jobs(target)) == before and not runs.exists()
    assert main(["jobs", "status", "no-such-job", "--state-dir", cluster2.dir]) == 2
    assert "no job 'no-such-job'" in capsys.readouterr().err

    t0 = time.monotonic()
    code, job, text = _submit(cluster2, capsys, f"cluster.storage={runs}", "run_name=two-nodes")
    assert code == 0 and job.startswith("tdc-"), text
    first_step = None
    log = ""
    for chunk in jobs.follow(target, job):
        log += chunk
        if first_step is None and "[pretrain] epoch 1/1 step 1/" in log:
            first_step = time.monotonic() - t0
    assert _wait(target, job, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", log[-3000:]
    # One copy of each worker line, not one per node (each node has its own Ray log directory).
    assert log.count("[pretrain] epoch 1/1 step 1/3 ") == 1, log[-3000:]
    with capsys.disabled():  # the figure README.md reports
        print(f"\nsubmit -> first training step: {first_step:.1f} s; submit -> SUCCEEDED {time.monotonic() - t0:.1f} s")

    # The two workers ran on two different Ray nodes (node ids recorded by every rank).
    run_dir = runs / "quickstart" / "two-nodes"
    last = ckpt.latest_checkpoint(run_dir / "checkpoints")
    nodes = [ckpt.load_rank(last, r)["node"] for r in range(2)]
    assert nodes[0] != nodes[1], nodes

    # The parent and one child per phase are on the cluster's MLflow server, all FINISHED; only rank 0
    # logged, so every step of a metric is there once.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster2.mlflow_uri)
    exp = client.get_experiment_by_name("tdcompress")
    found = client.search_runs([exp.experiment_id])
    parent = [r for r in found if r.info.run_name == "two-nodes"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == ["two-nodes-0-pretrain", "two-nodes-1-admm",
                                                          "two-nodes-2-evaluate"]
    assert all(r.info.status == "FINISHED" for r in children)
    # Provenance under Ray Jobs: the job's id (from Ray's job config in the driver's environment) and the
    # client's git commit (the job's upload has no .git; submit passes it with the job).
    from launcher.run.run_record import git_commit

    assert parent[0].data.tags["ray_job_id"] == job and parent[0].data.tags["mlflow.source.type"] == "JOB"
    assert git_commit() and parent[0].data.tags["mlflow.source.git.commit"] == git_commit()
    admm = next(r for r in children if r.info.run_name.endswith("-1-admm"))
    loss = client.get_metric_history(admm.info.run_id, "train_loss")
    assert loss and len({m.step for m in loss}) == len(loss), "a metric step was logged twice (more than rank 0?)"

    # `jobs stop` ends a running job.
    code, job2, text = _submit(cluster2, capsys, f"cluster.storage={runs}", "run_name=stopped",
                               "phases.0.epochs=200")
    assert code == 0, text
    _wait(target, job2, {"RUNNING"}, timeout=120)
    assert main(["jobs", "stop", job2, "--state-dir", cluster2.dir]) == 0
    assert _wait(target, job2, {"STOPPED", "FAILED", "SUCCEEDED"}, timeout=120) == "STOPPED"


def _a_worker_node(state) -> list[int]:
    """The pids of a worker node (not the head) that runs a Ray Train worker of this cluster: its raylet
    first, then the Ray Train workers it started. Killing them all is what a machine going down does; killing
    the raylet alone left its worker running on for a second or two, and on an idle host the tiny run
    finished before Ray noticed."""
    head_group = state.nodes[0]["pid"]
    by_raylet: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            cmd = (stat.parent / "cmdline").read_bytes()
            if not cmd.startswith(b"ray::RayTrainWorker"):
                continue
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            parent = Path(f"/proc/{ppid}")
            pgid = int((parent / "stat").read_text().rsplit(")", 1)[1].split()[2])
            if b"raylet" in (parent / "cmdline").read_bytes() and state.temp_dir.encode() in (
                    parent / "cmdline").read_bytes() and pgid != head_group:
                by_raylet.setdefault(ppid, []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    if not by_raylet:
        raise AssertionError("no Ray Train worker on a worker node of this cluster")
    raylet = min(by_raylet)
    return [raylet, *by_raylet[raylet]]


def _admm_checkpoint(run_dir: Path) -> dict:
    """The admm phase's final checkpoint: its path, meta and Z-update count."""
    path = [p for p in sorted((run_dir / "checkpoints").glob("ckpt-*")) if p.is_dir()
            and ckpt.read_meta(p)["phase"] == "admm"][-1]
    return {"path": path, "meta": ckpt.read_meta(path), "updates": ckpt.load_rank(path, 0)["admm"]["updates"]}


@pytest.mark.ray
@pytest.mark.slow
def test_worker_node_killed_mid_admm_resumes(cluster2, tmp_path, cifar_root, monkeypatch, capsys):
    """SIGKILL a node holding a worker (its raylet and workers) during ADMM: Ray Train restarts the group on the
    nodes left (cluster.max_failures=1), which resumes from the last checkpoint, ADMM state included.

    That a restarted group's weights equal an unfaulted run's is test_distributed_ray.py's (the same resume);
    here the node: the new group is not on the dead one, and the run goes on from the held checkpoint."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the cluster's MLflow server, not a stray store
    import os
    import signal

    monkeypatch.setenv("TDC_DATA_ROOT", str(cifar_root))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    target = jobs.resolve_target(None, cluster2.dir)
    # 2 ADMM epochs of 6 steps; the run holds after the first one's checkpoint (debug.hold_at) until the node is
    # down, so the node dies mid-ADMM, after that checkpoint, whatever the host's speed: tinycnn is enough (a
    # bigger model only made the run longer). 1280 images: 6 steps of 2 x 64 per epoch.
    phases = ("phases=[{kind: pretrain, epochs: 1, steps_per_epoch: 3}, {kind: admm, epochs: 2, steps_per_epoch: 6},"
              " {kind: evaluate}]")
    bigger = ("data.train_subset=1280",)
    runs = tmp_path / "runs"
    code, job, text = _submit(cluster2, capsys, f"cluster.storage={runs}", "run_name=fault", phases, *bigger,
                              "cluster.max_failures=1", "debug.hold_at={phase: 1, epoch: 1}")
    assert code == 0, text
    run_dir = runs / "quickstart" / "fault"

    def running() -> bool:
        status = jobs.status(target, job).status
        return getattr(status, "value", status) in ("PENDING", "RUNNING")

    wait_for_path(run_dir / "held-1-1", running, what=f"job {job}")
    held = ckpt.latest_checkpoint(run_dir / "checkpoints")
    meta = ckpt.read_meta(held)
    assert (meta["phase"], meta["epoch"], meta["phase_done"]) == ("admm", 1, False), meta
    held_nodes = {ckpt.load_rank(held, r)["node"] for r in range(2)}
    assert len(held_nodes) == 2, held_nodes
    for pid in _a_worker_node(cluster2):  # the node goes down: its raylet and its workers
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    log, back_at, mark = "", None, 0
    for chunk in jobs.follow(target, job):
        log += chunk
        if back_at is None and "[resume] from" in log[mark:]:
            resumed = log.index("[resume] from", mark)
            # Training again: the first step after the resume (from the held checkpoint: epoch 2). The time is
            # measured, not asserted; the log only dates the moment.
            if "[admm] epoch 2/2 step 1/" in log[resumed:]:
                back_at = time.monotonic()
            else:
                mark = resumed
    assert _wait(target, job, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", log[-3000:]
    assert back_at is not None, log[-3000:]
    with capsys.disabled():
        print(f"\nkill -> training again: {back_at - killed_at:.1f} s")

    # Resumed from the held checkpoint (phase 1, epoch 1), not from the start: every Z-update once.
    assert re.search(r"\[resume\] from \S+ \(phase 1 'admm', epoch 1,", log), log[-3000:]
    final = _admm_checkpoint(run_dir)
    assert final["meta"]["phase_done"] and final["updates"] == 6, final  # 12 steps, one Z-update per 2
    # The new group is on the two nodes alive: the held group's survivor and the spare, not the dead one.
    nodes = {ckpt.load_rank(final["path"], r)["node"] for r in range(2)}
    assert len(nodes) == 2 and len(nodes & held_nodes) == 1, (held_nodes, nodes)
