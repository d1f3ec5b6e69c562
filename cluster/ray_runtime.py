"""Ray: start the embedded local instance or connect to a cluster, and run the workers.

Embedded Ray binds every server to 127.0.0.1 (cluster/ray_workarounds.py) and has a small
object store (the workers exchange tensors through torch.distributed, not
through Ray's object store). The ``local`` backend runs the single worker in
this process with a one-rank gloo/NCCL process group: no Ray at all, which
is what a GPU box without Ray installed, and the 1-worker baseline of the
distributed tests, need.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from cluster.config import ClusterConfig
from cluster.dist import init_local_group
from cluster.local_cluster import metrics_port_env
from cluster.processes import free_port
from cluster.ray_workarounds import agent_http_port, loopback_only, token_auth_quietly
from trainer.context import WorkerJob
from trainer.export.malloc import has_glibc, with_tunables
from trainer.worker import train_func

# Variables the workers must see, set before any DeepSpeed import.
WORKER_ENV = {
    "DS_ACCELERATOR": "cpu",  # only used when the worker has no GPU (see worker_env)
    "PYTHONUNBUFFERED": "1",  # progress lines reach the driver as they are printed
    "RAY_TRAIN_V2_ENABLED": "1",
    # Ray Train's print patch re-emits every worker print through its logger: each line showed twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def worker_env(use_gpu: bool) -> dict[str, str]:
    env = {k: v for k, v in WORKER_ENV.items() if not (use_gpu and k == "DS_ACCELERATOR")}
    repo = str(Path(__file__).resolve().parents[1])
    # Nothing else of the driver's environment is copied: the data root and every other setting
    # travel in the typed WorkerJob, so a stray variable on the driver cannot change a run.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    if not use_gpu and has_glibc():
        # CPU training allocates its activations and gradients anew every step; with glibc's
        # defaults the large ones are fresh mmaps that page-fault in each time (trainer/export/malloc.py).
        # Measured (bench/admm_overhead.py, plain steps): ResNet-50 49 -> 68 img/s, ResNet-18 +10-40%.
        env["GLIBC_TUNABLES"] = with_tunables(os.environ.get("GLIBC_TUNABLES", ""))
    return env


def local_cpus() -> int:
    """CPUs this process may use (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def wants_gpu(cluster: ClusterConfig) -> bool:
    if cluster.use_gpu == "auto":
        return torch.cuda.is_available()
    return cluster.use_gpu == "yes"


def _cluster_address(address: str) -> str:
    """``auto`` made explicit: inside a Ray job the job server sets RAY_ADDRESS to its own cluster's GCS.

    Ray resolves "auto" without RAY_ADDRESS from shared temp state (the newest cluster started on
    this machine), which can be another Ray instance than the one the job runs on.
    """
    if address == "auto" and os.environ.get("RAY_ADDRESS", "auto") != "auto":
        return os.environ["RAY_ADDRESS"]
    return address


def _beside_job_env(env: dict[str, Any]) -> dict[str, Any] | None:
    """The driver's runtime_env without the variables a Ray job's runtime env already sets.

    Inside a job (`tdcompress submit`, `ray job submit --runtime-env-json ...`) Ray merges the job's
    runtime env with the one ray.init is given and refuses any variable both set ("Failed to merge
    the Job's runtime env"); the job's value wins here.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return env
    import json

    job_env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    mine = {k: v for k, v in env["env_vars"].items() if k not in job_env}
    return {"env_vars": mine} if mine else None


DASHBOARD_PORT = 8265  # Ray's default, what `ray job submit` and the docs assume


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def embedded_dashboard_port() -> int:
    """8265 when free, else a free port: another local run (or any other Ray) on this machine may hold it.

    Ray itself would try 8266, 8267, ... one after another, which two runs starting together race for.
    """
    return DASHBOARD_PORT if _port_free(DASHBOARD_PORT) else free_port()


@contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    """``extra`` in os.environ while the block runs (Ray's processes started in it inherit it), then as before."""
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ensure_ray(c: ClusterConfig) -> None:
    """Connect to ``c.address`` or start an embedded local Ray (once per process)."""
    import ray

    if ray.is_initialized():
        return
    gpu = wants_gpu(c)
    env = {"env_vars": worker_env(gpu)}
    # Ray Train's own actors (its placement-group cleaner) look the cluster up as "auto" unless RAY_ADDRESS says
    # which; with another Ray on the machine that failed ("Found multiple active Ray instances"). Every process
    # of this run gets its own cluster's GCS address.
    if c.address:
        address = _cluster_address(c.address)
        if address.split("://")[-1].startswith(("127.0.0.1:", "localhost:")):
            loopback_only()  # else Ray replaces 127.0.0.1 by the host's address, where a loopback head is not
        if "://" not in address and address != "auto":
            env["env_vars"]["RAY_ADDRESS"] = address
        ray.init(address=address, runtime_env=_beside_job_env(env), log_to_driver=True)
        return
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # a Ray job's driver: the cluster is right there
        raise ValueError("cluster.address: this run is a Ray job on a cluster but has no cluster.address, so it would "
                         "start a Ray of its own on the head node; add cluster.address=auto (the job's own cluster)")
    loopback_only()
    need = c.num_workers * c.cpus_per_worker
    port, gcs_port = embedded_dashboard_port(), free_port()
    env["env_vars"]["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"  # only the workers': the driver's would mean "connect"
    # Ray Train's preemption watcher polls for node drains, which a single local node never has; its actor,
    # force-killed at every end of training, left an error line (E) in the run's output.
    env["env_vars"]["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    # Ray's dashboard and autoscaler take fixed Prometheus ports (44227, 44217) unless told otherwise in their
    # environment; a second Ray on the machine then logged bind errors. The GCS port is read from the
    # environment too, so the workers' RAY_ADDRESS can be known before Ray starts.
    with _environ({**metrics_port_env(), "RAY_GCS_SERVER_PORT": str(gcs_port)}), token_auth_quietly(), \
            agent_http_port(free_port()):
        # address="local": a new Ray of this run's own. Without an address Ray joins the cluster the machine's
        # last `ray start` recorded (a `tdcompress cluster up` left running), and refuses num_cpus there.
        ray.init(address="local", num_cpus=max(need, local_cpus()), num_gpus=torch.cuda.device_count() if gpu else 0,
                 # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls;
                 # without it that cleaner logs a warning every few seconds. Loopback only.
                 object_store_memory=c.object_store_mb * 2**20, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, _node_ip_address="127.0.0.1", runtime_env=env, log_to_driver=True)
    if port != DASHBOARD_PORT:
        print(f"embedded Ray: dashboard at http://127.0.0.1:{port} ({DASHBOARD_PORT} is in use on this machine)",
              flush=True)


def _quiet_ray_train_reports() -> None:
    """Ray Train 2.60 logs every ``ray.train.report`` call (the whole metrics dict) at INFO from each
    worker; our own progress lines already say it. Its logger is named by its file path."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _ray_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's ``train_loop_per_worker``: the trainer's entry with Ray's report and node id."""
    import ray
    import ray.train

    _quiet_ray_train_reports()
    return train_func(config["job"], report=ray.train.report, node=ray.get_runtime_context().get_node_id())


def run_ray(job: WorkerJob, c: ClusterConfig, run_name: str) -> Any:
    """Run ``job`` on ``c.num_workers`` Ray Train workers; returns the Ray Result."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.rendezvous import BoundTorchConfig

    ensure_ray(c)
    gpu = wants_gpu(c)
    trainer = TorchTrainer(
        train_loop_per_worker=_ray_train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": 1} if gpu else {})}),
        # Rank 0's rendezvous listens on its node's address only, not on every interface.
        torch_config=BoundTorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=run_name, storage_path=str(Path(c.storage, "_ray").resolve()),
                             failure_config=FailureConfig(max_failures=c.max_failures),
                             worker_runtime_env={"env_vars": worker_env(gpu)}),
    )
    try:
        return trainer.fit()
    except Exception as e:
        cause = worker_cause(e)
        if cause is e:
            raise
        raise cause from e  # the worker's own error (its type and message); Ray's report stays chained to it


def worker_cause(error: BaseException) -> BaseException:
    """The exception a worker raised, out of Ray Train's wrapping (``WorkerGroupError.worker_failures``: rank ->
    a wrapper holding the original), from the lowest failed rank; ``error`` itself when it holds none (a worker
    process that died, a controller error)."""
    failures = getattr(error, "worker_failures", None)
    if not failures:
        return error
    first = failures[min(failures)]
    base = getattr(first, "_base_exc", first)  # Ray Train's UserExceptionWithTraceback keeps the original here
    return base if isinstance(base, Exception) else error


def run_local(job: WorkerJob, c: ClusterConfig) -> Any:
    """Run ``job`` in this process as rank 0 of a one-rank process group."""
    init_local_group(wants_gpu(c))
    return train_func(job)


def run_workers(job: WorkerJob, c: ClusterConfig, run_name: str) -> Any:
    """Run ``job`` as ``c.backend`` says: Ray Train workers, or this process alone."""
    if c.backend == "local":
        return run_local(job, c)
    return run_ray(job, c, run_name)
