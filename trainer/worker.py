"""Per-worker entry: build data and model, then run (or resume) the phase sequence.

It runs unchanged under Ray Train (``cluster.ray_runtime`` calls it with Ray's
report function) or in-process (backend ``local``); it knows nothing of Ray.
"""
from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from trainer.checkpoints import files as ckpt
from trainer.checkpoints.stateful import restore_model
from trainer.config import COMPRESSING_PHASES, DataConfig
from trainer.context import WorkerContext, WorkerJob
from trainer.core.engine import prepare_deepspeed_env
from trainer.data import dataset_identity, load_datasets, make_loader
from trainer.hardware import cpu_model, describe_device
from trainer.init_weights import apply_init
from trainer.logs import get_logger
from trainer.models import build_model
from trainer.phases import run_phase
from trainer.phases.init_report import report_init_accuracy
from trainer.phases.training import step_offset
from trainer.ranks import barrier, rank_and_world
from trainer.tracking import runs as tracking_runs
from trainer.tracking.tracker import Tracker

logger = get_logger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def worker_device(use_gpu: str) -> torch.device:
    """``use_gpu``: "yes" (fail without CUDA), "no", or "auto" (CUDA when this worker sees one)."""
    if use_gpu == "yes" and not torch.cuda.is_available():
        raise RuntimeError("cluster.use_gpu is 'yes' but this worker sees no CUDA device")
    if use_gpu != "no" and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def build_context(job: WorkerJob) -> WorkerContext:
    cfg = job.config
    rank, world = rank_and_world()
    device = worker_device(job.use_gpu)
    d = cfg.data
    sets = load_datasets(d.dataset, d.root, augment=d.augment, seed=cfg.seed, train_subset=d.train_subset,
                         eval_subset=d.eval_subset, download=d.download, synthetic_train=d.synthetic_train,
                         synthetic_eval=d.synthetic_eval, skip_bad_images=d.skip_bad_images,
                         decode=d.decode, shuffle_buffer=d.shuffle_buffer)
    micro = d.batch_size // (world * cfg.optim.grad_accum)
    train_loader = make_loader(sets.train, micro, rank=rank, world_size=world, shuffle=True, seed=cfg.seed,
                               drop_last=True, num_workers=d.loader_workers, device=device)
    eval_loader = make_loader(sets.eval, max(1, d.eval_batch_size // world), rank=rank, world_size=world,
                              shuffle=False, seed=cfg.seed, drop_last=False, num_workers=d.loader_workers,
                              device=device)
    if d.device_cache:  # decode each split once, keep it on the device, augment there (trainer/data/device_cache.py)
        from trainer.data.device_cache import device_loaders

        train_loader, eval_loader = device_loaders(sets.train, sets.eval, micro, max(1, d.eval_batch_size // world),
                                                   rank=rank, world_size=world, seed=cfg.seed, device=device)
    lead = rank == 0 and bool(job.tracking_uri)  # only rank 0 logs
    # What the tracking server does not take waits in this file (shared by these Trackers) until it answers.
    buffer = Path(job.run_dir) / "tracking-buffer-rank0.jsonl"
    parent = Tracker(job.tracking_uri, job.parent_run_id if lead else None, buffer=buffer)
    # No-ops until their phase starts: _tracked_phase opens each phase's MLflow run then (trainer.tracking.runs).
    phases = [Tracker(None, None) for _ in cfg.phases]
    if lead:
        parent.tags({"device": describe_device(device, world), "cpu_model": cpu_model()})
        parent.dataset(**dataset_record(d, len(sets.train), len(sets.eval), cfg.seed))
    return WorkerContext(cfg=cfg, rank=rank, world=world, device=device, run_dir=Path(job.run_dir),
                         train_loader=train_loader, eval_loader=eval_loader, num_classes=sets.num_classes,
                         image_size=sets.image_size, parent=parent, phase_trackers=phases, teachers=job.teachers)


def dataset_record(d: DataConfig, n_train: int, n_eval: int, seed: int) -> dict[str, Any]:
    """The run's dataset for MLflow's dataset tracking: source directory, split sizes and a digest.

    The digest names the data actually read: the files at the top of the root (name, size, mtime),
    the split sizes and the subset seed; the same data root and subsets give the same digest.
    """
    source = str(Path(d.root).expanduser().resolve()) if d.root else f"synthetic:{d.dataset}"
    h = hashlib.sha256(f"{d.dataset}|{n_train}|{n_eval}|{seed}".encode())
    if d.root and Path(d.root).is_dir():
        for f in sorted(Path(d.root).iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return {"name": dataset_identity(d.dataset, d.root), "source": source, "digest": h.hexdigest()[:12],
            "profile": {"format": d.dataset, "train_images": n_train, "eval_images": n_eval,
                        "train_subset": d.train_subset, "eval_subset": d.eval_subset}}


def _tracked_phase(job: WorkerJob, ctx: WorkerContext, index: int, model: torch.nn.Module, resume):
    """Run phase ``index`` inside its own MLflow child run (rank 0 opens it now and closes it at the end).

    A crash closes it FAILED with the error as a tag, an interrupt KILLED; the global step offset makes
    its curves continue those of the phases before. Opening and closing are buffered like the phase's
    records, so a tracking server away at either moment loses neither.
    """
    kind = ctx.cfg.phases[index].kind
    lead = ctx.rank == 0 and bool(job.tracking_uri and job.parent_run_id)
    buffer = Path(job.run_dir) / "tracking-buffer-rank0.jsonl"
    ctx.phase_clock = time.time()
    if resume is None:  # a resumed phase counts on from the seconds its checkpoint says it had run
        ctx.phase_active_before = 0.0
    if lead:
        tracker = tracking_runs.start_phase_tracker(job.tracking_uri, job.parent_run_id, index, kind,
                                                 tracking_runs.phase_params(ctx.cfg, index, job.run_dir), buffer)
    else:
        tracker = Tracker(None, None)
    tracker.step_offset = step_offset(ctx, index)
    ctx.phase_trackers[index] = tracker
    try:
        model, out = run_phase(ctx, index, model, resume)
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        tracking_runs.end_phase_run(tracker, "KILLED" if interrupted else "FAILED", error=None if interrupted else e,
                                 active_s=_active_s(ctx, resume))
        tracker.flush(warn=False)
        raise
    if kind == "pretrain" and "top1" in out:  # the dense baseline the compressed model is compared against
        ctx.parent.metrics({"dense_top1": out["top1"], "dense_top5": out["top5"]}, 0)
        ctx.parent.tags({"dense_baseline": f"phase {index} (pretrain) final top-1"})
    tracking_runs.end_phase_run(tracker, "FINISHED", active_s=_active_s(ctx, resume))
    tracker.flush(warn=False)
    return model, out


def _active_s(ctx: WorkerContext, resume) -> float | None:
    """Seconds phase has run over all its attempts when it was resumed (None: one attempt, its own times)."""
    return None if resume is None else ctx.phase_active_s()


def train_func(job: WorkerJob, report: Callable[[dict[str, float]], None] | None = None,
               node: str = "local") -> dict[str, Any]:
    """Run ``job`` on this worker: every rank of the process group calls it.

    Args:
        report: called with each phase's scalar results on every rank (Ray Train's report).
        node: the node this worker runs on, recorded in checkpoints.
    Returns:
        ``{"<index>:<kind>": metrics}`` of the phases this call ran.
    """
    prepare_deepspeed_env()
    ctx = build_context(job)
    ctx.report, ctx.node = report, node
    cfg = ctx.cfg
    seed_everything(cfg.seed)
    model = build_model(cfg.model.name, ctx.num_classes)

    start_phase, resume = 0, None
    # The newest checkpoint that verifies (rank 0 checks, all ranks agree); damaged newer ones are
    # skipped, so a restart never retries the same bad file. None intact at all: CheckpointError.
    last, skipped = ckpt.resume_checkpoint(ctx.ckpt_root)
    for path, why in skipped:
        logger.info(f"[resume] skipped {path}: {why}")
    if last is not None:
        meta = ckpt.read_meta(last)
        ctx.ckpt_index = meta["index"] + 1
        model = restore_model(model, ckpt.load_shared(last)["model"])
        start_phase = meta["phase_index"] + (1 if meta["phase_done"] else 0)
        if not meta["phase_done"]:
            resume = last
            ctx.phase_active_before = float(meta.get("phase_active_s", 0.0))
        logger.info(f"[resume] from {last} (phase {meta['phase_index']} '{meta['phase']}', epoch {meta['epoch']}, "
                    f"done={meta['phase_done']}, world size {meta['world_size']} -> {ctx.world})")

    # model.init: only a fresh start takes the initial weights; a resumed run's checkpoint already has its own.
    init = job.init if last is None else None
    if init is not None:
        model = apply_init(model, init)
        logger.info(f"[init] model weights from {init.describe()}")
    model = model.to(ctx.device)
    if init is not None and cfg.phases[0].kind in (*COMPRESSING_PHASES, "rank_prune"):
        report_init_accuracy(ctx, model)  # the dense baseline this compressed run starts from
    results: dict[str, Any] = {}
    for index in range(start_phase, len(cfg.phases)):
        model, out = _tracked_phase(job, ctx, index, model, resume if index == start_phase else None)
        results[f"{index}:{cfg.phases[index].kind}"] = out
    ctx.parent.flush()  # send what an unreachable tracking server did not take (the buffer all Trackers share)
    barrier()
    return results
