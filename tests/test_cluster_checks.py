"""Checks behind running on a cluster that need no cluster: relative paths inside a Ray job, no address inside a
job, `submit --resume`, the command lines of configs/cluster/* for a multi-node run, and the choice of the embedded
Ray's ports (a run beside another Ray on 8265: tests/test_run_listeners.py).
"""
from __future__ import annotations

import json
import os
import shlex
import socket
from pathlib import Path

import pytest
import yaml

from cluster import local_cluster, processes, ray_runtime
from cluster.config import ClusterConfig
from cluster.storage import check_cluster_run, relative_path_problem, storage_problem, tracking_problem
from launcher.cli import main
from launcher.config import ConfigError, load_config
from launcher.run.pipeline import make_plan
from trainer.data import DATASET_SHAPES

PROJECT = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart.yaml"


# ---------------------------------------------------------------- no cluster needed

def test_embedded_dashboard_port_is_8265_when_free_else_another():
    held = socket.socket()
    try:
        if ray_runtime._port_free(ray_runtime.DASHBOARD_PORT):
            held.bind(("127.0.0.1", ray_runtime.DASHBOARD_PORT))  # as a second local run would find it
            held.listen()
        port = ray_runtime.embedded_dashboard_port()
        assert port != ray_runtime.DASHBOARD_PORT and ray_runtime._port_free(port)
    finally:
        held.close()
    free = local_cluster.free_port()
    original = ray_runtime.DASHBOARD_PORT
    try:
        ray_runtime.DASHBOARD_PORT = free  # a default port that is free is kept
        assert ray_runtime.embedded_dashboard_port() == free
    finally:
        ray_runtime.DASHBOARD_PORT = original


def test_ray_processes_environment_is_restored(monkeypatch):
    monkeypatch.setenv("DASHBOARD_METRIC_PORT", "1")
    monkeypatch.delenv("AUTOSCALER_METRIC_PORT", raising=False)
    with ray_runtime._environ(local_cluster.metrics_port_env()):
        inside = int(os.environ["DASHBOARD_METRIC_PORT"]), int(os.environ["AUTOSCALER_METRIC_PORT"])
    assert inside[0] != 1 and inside[1] > 0
    assert os.environ["DASHBOARD_METRIC_PORT"] == "1" and "AUTOSCALER_METRIC_PORT" not in os.environ


def test_an_embedded_run_starts_its_own_ray_beside_a_cluster_up(tmp_path, monkeypatch):
    """`cluster up` leaves its head's address where Ray looks first when ray.init has no address
    (<temp>/ray/ray_current_cluster): an embedded run must start a Ray of its own all the same, not join that
    cluster (where its num_cpus is refused)."""
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6379")
    assert canonicalize_bootstrap_address(None).endswith(":6379")  # what a bare ray.init() would join
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kw: seen.update(address=address))
    ray_runtime.ensure_ray(ClusterConfig(num_workers=1))
    assert seen["address"] is not None and canonicalize_bootstrap_address(seen["address"]) is None  # a new Ray


def test_ports_we_choose_are_free_and_below_the_ephemeral_range():
    """An outgoing connection takes its local port from the kernel's ephemeral range: a port chosen there can be
    gone before the server binds it; one below it cannot be taken that way."""
    low = processes._ephemeral_start()
    ports = {processes.free_port() for _ in range(20)}
    assert len(ports) > 1 and all(20000 <= p < low for p in ports), (low, ports)
    with socket.socket() as s:
        port = min(ports)
        s.bind(("127.0.0.1", port))  # free a moment ago, bindable now
        s.listen()
        assert processes.free_port() != port


def test_relative_paths_inside_a_ray_job_are_refused(tmp_path, monkeypatch):
    """A run in a job's uploaded working dir (Ray's cache) must not keep its runs or SQLite store there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert relative_path_problem("runs", "sqlite:///mlruns.db") is None  # a plain shell: the user's directory
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"A": "1"}}}))
    assert relative_path_problem("runs", None) is None  # a job without a working dir runs where it was started
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg.zip"}}))
    why = relative_path_problem("runs", None)
    assert why.startswith("cluster.storage: 'runs'") and str(tmp_path) in why and "absolute path" in why
    elsewhere = tmp_path.parent / "shared"
    assert relative_path_problem(str(elsewhere / "runs"), "http://mlflow:5000") is None
    why = relative_path_problem(str(elsewhere / "runs"), f"sqlite:///{tmp_path}/mlruns.db")  # the default, resolved
    assert why.startswith("tracking.uri:") and "sqlite:////shared" in why
    # The driver's check refuses it before Ray is touched (no address is contacted).
    with pytest.raises(ValueError, match="cluster.storage: 'runs' resolves inside"):
        check_cluster_run(ClusterConfig(address="auto"), None)


def test_no_address_inside_a_ray_job_is_refused(monkeypatch):
    import ray

    if ray.is_initialized():
        pytest.skip("Ray already runs in this test process")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))
    with pytest.raises(ValueError, match="add cluster.address=auto"):
        ray_runtime.ensure_ray(ClusterConfig(num_workers=1))
    assert not ray.is_initialized()


def test_submit_resume_names_one_run(tmp_path, capsys):
    assert main(["submit", CONFIG, "run_name=a", "--resume", "b", "--state-dir", str(tmp_path)]) == 2
    assert "name different runs" in capsys.readouterr().err


def _definition_commands() -> list[tuple[str, list[str]]]:
    """(source, argv after `run`/`submit`) of the tdcompress command in each file of configs/cluster."""
    out = []
    rayjob = yaml.safe_load((PROJECT / "configs/cluster/kuberay-rayjob.yaml").read_text())
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    out.append(("kuberay-rayjob.yaml", argv[argv.index("run") + 1:]))
    text = (PROJECT / "configs/cluster/ray-cluster-gpu.yaml").read_text()
    lines = [line.lstrip("#").strip() for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("tdcompress submit"))
    command = ""
    for line in lines[start:]:
        command += line.rstrip("\\") + " "
        if not line.endswith("\\"):
            break
    argv = shlex.split(command)
    out.append(("ray-cluster-gpu.yaml", argv[argv.index("submit") + 1:]))
    return out


def test_cluster_definitions_run_as_written_on_several_nodes():
    """The command lines in configs/cluster/* load, plan and pass the multi-node storage and tracking checks."""
    commands = _definition_commands()
    assert len(commands) == 2
    for source, argv in commands:
        args = [a for i, a in enumerate(argv) if not a.startswith("--") and not argv[i - 1].startswith("--")]
        config, overrides = args[0], args[1:]
        assert config.startswith("configs/imagenet_") and (PROJECT / config).is_file(), source
        cfg = load_config(PROJECT / config, [*overrides, "cluster.address=auto"])  # what submit adds
        c = cfg.cluster
        assert c.shared_storage and c.storage.startswith("/mnt/shared/"), source
        assert storage_problem(c.storage, c.shared_storage, nodes=4) is None, source
        assert cfg.tracking.uri and tracking_problem(cfg.tracking.uri, c.storage, c.shared_storage, 4) is None, source
        assert cfg.data.root and cfg.data.root.startswith("/mnt/shared/"), source
        assert make_plan(cfg, *DATASET_SHAPES[cfg.data.dataset]) is not None, source
    for config in sorted(PROJECT.glob("configs/imagenet_*.yaml")):  # every ImageNet config is multi-node ready
        c = load_config(config, ["tracking.uri=http://mlflow:5000"]).cluster
        assert c.shared_storage and storage_problem(c.storage, c.shared_storage, nodes=4) is None, config.name


def test_ray_cluster_definition_submit_plans_the_run(monkeypatch):
    """`tdcompress submit` with the ray-cluster-gpu.yaml command: planned and checked on the client; an MLflow
    server on the head's private address, unreachable from here, is a note (the driver checks it there)."""
    from launcher.submit import plan_submission

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = dict(_definition_commands())["ray-cluster-gpu.yaml"]
    args = [a for i, a in enumerate(argv) if not a.startswith("--") and not argv[i - 1].startswith("--")]
    sub = plan_submission(str(PROJECT / args[0]), args[1:], None, False, None, {})  # HEAD_PRIVATE_IP: no such host
    assert "cluster.address=auto" in sub.entrypoint and sub.run_dir.startswith("/mnt/shared/tdcompress/imagenet_")
    assert sub.tracking_uri == "http://HEAD_PRIVATE_IP:5000"
    assert any(n.startswith("tracking.uri: http://HEAD_PRIVATE_IP:5000 does not answer from here") for n in sub.notes)
    with pytest.raises(ConfigError, match="cannot be reached from here"):  # on this machine: refused
        plan_submission(str(PROJECT / args[0]), [*args[1:], f"tracking.uri=http://127.0.0.1:{local_cluster.free_port()}"],
                        None, False, None, {})



def test_down_waits_on_running_processes_not_on_zombies():
    """`down` waits while a stopped group still runs; a group leader `up` started from this process stays a zombie
    until reaped, and must not keep `down` waiting its whole grace."""
    import subprocess
    import sys
    import time

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    done = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    try:
        while Path(f"/proc/{done.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)  # until it has exited; it is not reaped before done.wait() below
        assert processes.group_members(done.pid) == [done.pid]
        assert not processes.group_alive(done.pid)
        assert processes.group_alive(live.pid)
    finally:
        live.kill()
        live.wait()
        done.wait()
