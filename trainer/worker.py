"""Per-worker entry: build data and model, then run (or resume) the phase sequence.

This is the composition root on the worker side: it is the one trainer
module that may reach into ``admm`` (through :mod:`trainer.phases`), and it
runs unchanged under Ray Train or in-process (backend ``local``).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from launcher.config import from_dict
from launcher.schema import Config
from trainer import checkpoint as ckpt
from trainer.data import load_datasets, make_loader
from trainer.engine import prepare_deepspeed_env
from trainer.loop import rank_and_world
from trainer.models import build_model
from trainer.tracking import Tracker


@dataclass
class WorkerContext:
    """Everything a phase needs that outlives one phase."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    train_loader: Any
    eval_loader: Any
    num_classes: int
    image_size: int
    parent: Tracker
    phase_trackers: list[Tracker]
    ckpt_index: int = 0
    report: Any = None  # ray.train.report under Ray Train (a collective: every rank calls it)
    node: str = "local"  # Ray node id of this worker (recorded in checkpoints)

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(cfg: Config) -> torch.device:
    want = cfg.cluster.use_gpu
    if want == "yes" and not torch.cuda.is_available():
        raise RuntimeError("cluster.use_gpu is 'yes' but this worker sees no CUDA device")
    if want != "no" and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def data_root(cfg: Config) -> str | None:
    return cfg.data.root or os.environ.get("TDC_DATA_ROOT")


def build_context(payload: dict[str, Any]) -> WorkerContext:
    cfg: Config = from_dict(Config, payload["config"])
    rank, world = rank_and_world()
    device = pick_device(cfg)
    d = cfg.data
    sets = load_datasets(d.dataset, data_root(cfg), augment=d.augment, seed=cfg.seed, train_subset=d.train_subset,
                         eval_subset=d.eval_subset, download=d.download, synthetic_train=d.synthetic_train,
                         synthetic_eval=d.synthetic_eval)
    micro = d.batch_size // (world * cfg.optim.grad_accum)
    train_loader = make_loader(sets.train, micro, rank=rank, world_size=world, shuffle=True, seed=cfg.seed,
                               drop_last=True, num_workers=d.loader_workers)
    eval_loader = make_loader(sets.eval, max(1, d.eval_batch_size // world), rank=rank, world_size=world,
                              shuffle=False, seed=cfg.seed, drop_last=False, num_workers=d.loader_workers)
    uri = payload.get("tracking_uri")
    ids = payload.get("run_ids") or {}
    lead = rank == 0 and bool(uri)
    parent = Tracker(uri, ids.get("parent") if lead else None)
    phases = [Tracker(uri, rid if lead else None) for rid in ids.get("phases", [None] * len(cfg.phases))]
    return WorkerContext(cfg=cfg, rank=rank, world=world, device=device, run_dir=Path(payload["run_dir"]),
                         train_loader=train_loader, eval_loader=eval_loader, num_classes=sets.num_classes,
                         image_size=sets.image_size,
                         parent=parent, phase_trackers=phases)


def _quiet_ray_train_reports() -> None:
    """Ray Train 2.60 logs every ``ray.train.report`` call (the whole metrics dict) at INFO from each
    worker; our own progress lines already say it. Its logger is named by its file path."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_func(payload: dict[str, Any]) -> dict[str, Any]:
    """Ray Train ``train_loop_per_worker`` (also called directly by the local backend)."""
    from trainer.phases import run_phase, restore_model

    prepare_deepspeed_env()
    ctx = build_context(payload)
    if payload.get("backend") == "ray":
        import ray.train

        ctx.report = ray.train.report
        ctx.node = ray.get_runtime_context().get_node_id()
        _quiet_ray_train_reports()
    cfg = ctx.cfg
    seed_everything(cfg.seed)
    model = build_model(cfg.model.name, ctx.num_classes)

    start_phase, resume = 0, None
    last = ckpt.latest_checkpoint(ctx.ckpt_root)
    if last is not None:
        meta = ckpt.read_meta(last)
        ctx.ckpt_index = meta["index"] + 1
        model = restore_model(model, ckpt.load_shared(last), cfg)
        start_phase = meta["phase_index"] + (1 if meta["phase_done"] else 0)
        if not meta["phase_done"]:
            resume = last
        if ctx.rank == 0:
            print(f"[resume] from {last} (phase {meta['phase_index']} '{meta['phase']}', epoch {meta['epoch']}, "
                  f"done={meta['phase_done']}, world size {meta['world_size']} -> {ctx.world})", flush=True)

    model = model.to(ctx.device)
    results: dict[str, Any] = {}
    for index in range(start_phase, len(cfg.phases)):
        model, out = run_phase(ctx, index, model, resume if index == start_phase else None)
        results[f"{index}:{cfg.phases[index].kind}"] = out
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return results

