"""Ray: start the embedded local instance or connect to a cluster, and run the workers.

Embedded Ray binds to 127.0.0.1 with no dashboard unless asked, and a small
object store (the workers exchange tensors through torch.distributed, not
through Ray's object store). The ``local`` backend runs the single worker in
this process with a one-rank gloo/NCCL process group: no Ray at all, which
is what a GPU box without Ray installed, and the 1-worker baseline of the
distributed tests, need.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch

from launcher.schema import Config
from trainer.malloc import has_glibc, with_tunables

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
    # The project's own switches (data root, fault injection) follow the driver to every worker.
    env.update({k: v for k, v in os.environ.items() if k.startswith("TDC_")})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    if not use_gpu and has_glibc():
        # CPU training allocates its activations and gradients anew every step; with glibc's
        # defaults the large ones are fresh mmaps that page-fault in each time (trainer/malloc.py).
        # Measured (bench/admm_overhead.py, plain steps): ResNet-50 49 -> 68 img/s, ResNet-18 +10-40%.
        env["GLIBC_TUNABLES"] = with_tunables(os.environ.get("GLIBC_TUNABLES", ""))
    return env


def wants_gpu(cfg: Config) -> bool:
    if cfg.cluster.use_gpu == "auto":
        return torch.cuda.is_available()
    return cfg.cluster.use_gpu == "yes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_ray(cfg: Config) -> None:
    """Connect to ``cluster.address`` or start an embedded local Ray (once per process)."""
    import ray

    if ray.is_initialized():
        return
    c = cfg.cluster
    gpu = wants_gpu(cfg)
    env = {"env_vars": worker_env(gpu)}
    if c.address:
        ray.init(address=c.address, runtime_env=env, log_to_driver=True)
        return
    need = c.num_workers * c.cpus_per_worker
    ray.init(num_cpus=max(need, os.cpu_count() or 1), num_gpus=torch.cuda.device_count() if gpu else 0,
             # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls;
             # without it that cleaner logs a warning every few seconds. Loopback only.
             object_store_memory=c.object_store_mb * 2**20, include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", runtime_env=env, log_to_driver=True)


def run_ray(train_func: Callable[[dict], Any], payload: dict[str, Any], cfg: Config, run_name: str) -> Any:
    """Run ``train_func`` on ``cluster.num_workers`` Ray Train workers; returns the Ray Result."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray(cfg)
    gpu = wants_gpu(cfg)
    c = cfg.cluster
    trainer = TorchTrainer(
        train_loop_per_worker=train_func,
        train_loop_config={**payload, "backend": "ray"},
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": 1} if gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=run_name, storage_path=str(Path(c.storage, "_ray").resolve()),
                             failure_config=FailureConfig(max_failures=c.max_failures),
                             worker_runtime_env={"env_vars": worker_env(gpu)}),
    )
    return trainer.fit()


def run_local(train_func: Callable[[dict], Any], payload: dict[str, Any], cfg: Config) -> Any:
    """Run ``train_func`` in this process as rank 0 of a one-rank process group."""
    import torch.distributed as dist

    gpu = wants_gpu(cfg)
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # One group for the life of the process: DeepSpeed caches the group it first sees, so a
    # destroyed-and-recreated group would leave it holding a dead handle on the next run.
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        dist.init_process_group("nccl" if gpu else "gloo", rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("backend 'local' needs a one-rank process group; this process has "
                           f"{dist.get_world_size()} ranks")
    return train_func({**payload, "backend": "local"})


def run_workers(train_func: Callable[[dict], Any], payload: dict[str, Any], cfg: Config, run_name: str) -> Any:
    if cfg.cluster.backend == "local":
        return run_local(train_func, payload, cfg)
    return run_ray(train_func, payload, cfg, run_name)
