"""The train/eval loop. It knows nothing of compression: components hook in at fixed points.

Hook points, in order, for every optimizer step:
  forward + loss -> engine.backward (gradient hooks registered by components
  run here, before DeepSpeed's data-parallel average) -> engine.step ->
  ``on_step_end``; and ``on_epoch_end`` after each epoch. The full contract
  (prepare, attach, checkpoint, detach) is :mod:`trainer.core.component`.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterable, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainer.core.component import Component, LoopState
from trainer.core.engine import Precision
from trainer.logs import get_logger
from trainer.ranks import distributed, rank_and_world

logger = get_logger(__name__)

class LossFn(Protocol):
    """A training loss other than the label cross-entropy: called on every micro-batch."""

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def pop_metrics(self) -> dict[str, float]: ...


@torch.no_grad()
def average_batchnorm_stats(model: nn.Module) -> int:
    """Replace every BatchNorm's running mean and variance by their mean over the data-parallel ranks.

    Each rank updates its running statistics from its own shard of every batch, and nothing in
    DeepSpeed reconciles them, so replicas drift apart (seen: 21 layers differing by up to 0.5 after
    a quickstart run). Evaluation pools all ranks while only rank 0's model is saved, so the
    reported accuracy was not the saved model's. Averaging the buffers before every evaluation and
    checkpoint makes all replicas the saved model (timm's ``distribute_bn`` does the same). The
    mean of per-shard variances omits the small between-shard spread of the means; the shards
    are random draws of one distribution, so that term is negligible. SyncBatchNorm would fix the
    statistics during training too, at one all-reduce per BN layer per step: not worth it on gloo.

    Returns the number of buffers averaged (0 on one rank).
    """
    if rank_and_world()[1] == 1:
        return 0
    buffers = [t for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for t in (m.running_mean, m.running_var) if t is not None]
    if not buffers:
        return 0
    flat = torch.cat([b.reshape(-1).double() for b in buffers])  # one collective for all layers
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for b, v in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(v.view_as(b))
    return len(buffers)


def _to(x: torch.Tensor, device: torch.device, precision: Precision) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if precision.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# long: one step is one sequence (forward, loss, backward, hooks, optimizer, log) best read unbroken
def train_epoch(engine, loader: Iterable, state: LoopState, *, device: torch.device, precision: Precision,
                label_smoothing: float, hooks: Sequence[Component], log_every: int,
                log: Callable[[dict[str, float], int], None], loss_fn: LossFn | None = None) -> dict[str, float]:
    """One epoch (or ``state.steps_per_epoch`` optimizer steps) through the DeepSpeed engine.

    ``loss_fn`` replaces the label cross-entropy (e.g. :class:`trainer.core.distill.DistillLoss`); what its
    ``pop_metrics()`` returns is logged with the loop's own metrics.

    Returns:
        Mean training loss of the epoch, images/s (all ranks) and the last lr.
    """
    world = rank_and_world()[1]
    engine.train()
    accum = engine.gradient_accumulation_steps()
    total_loss = torch.zeros((), device=device)
    window_loss = torch.zeros((), device=device)
    n_steps = window_steps = 0
    t_window = t_start = time.perf_counter()
    images = 0
    for i, (x, y) in enumerate(loader):
        x, y = _to(x, device, precision), y.to(device, non_blocking=True)
        logits = engine(x)
        loss = loss_fn(logits, x, y) if loss_fn else F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        engine.backward(loss)
        engine.step()
        images += x.shape[0] * world
        if (i + 1) % accum != 0:  # engine.step() only stepped the optimizer on the boundary
            continue
        # Accumulate on device: a .item() per step would synchronise a GPU every step.
        total_loss += loss.detach()
        window_loss += loss.detach()
        n_steps += 1
        window_steps += 1
        state.step += 1
        for h in hooks:
            h.on_step_end(state)
        if state.step % log_every == 0 or n_steps == state.steps_per_epoch:
            now = time.perf_counter()
            ips = images / max(now - t_window, 1e-9)
            metrics = {"train_loss": (window_loss / window_steps).item(), "lr": engine.get_lr()[0],
                       "images_per_s": ips, **(loss_fn.pop_metrics() if loss_fn else {})}
            if not math.isfinite(metrics["train_loss"]):  # checked where the loss is read anyway: no extra sync
                raise FloatingPointError(f"{state.phase}: the training loss is {metrics['train_loss']} at step "
                                         f"{state.step}; lower the learning rate (optim.lr or phases.N.lr) "
                                         "or enable optim.grad_clip")
            log(metrics, state.step)
            done = state.epoch * state.steps_per_epoch + n_steps
            left = state.epochs * state.steps_per_epoch - done
            eta = (now - t_start) / n_steps * left
            logger.info(f"[{state.phase}] epoch {state.epoch + 1}/{state.epochs} step {n_steps}/{state.steps_per_epoch}"
                     f" loss {metrics['train_loss']:.4f} lr {metrics['lr']:.4g} {ips:,.0f} img/s eta {_fmt_time(eta)}")
            window_loss.zero_()
            window_steps = images = 0
            t_window = now
        if n_steps >= state.steps_per_epoch:
            break
    state.epoch += 1
    for h in hooks:
        h.on_epoch_end(state)
    return {"epoch_train_loss": (total_loss / max(n_steps, 1)).item(),
            "epoch_time_s": time.perf_counter() - t_start}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, device: torch.device, precision: Precision) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean loss over the whole eval set, summed over ranks.

    The eval loader shards without padding, so summed counts are exact.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, n
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision.bf16 else contextlib.nullcontext())
    with autocast:
        for x, y in loader:
            x, y = _to(x, device, precision), y.to(device, non_blocking=True)
            logits = model(x).float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(y[:, None])
            sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                                 hit[:, 0].sum().double(), hit.any(dim=1).sum().double(),
                                 torch.tensor(float(y.numel()), dtype=torch.float64, device=device)])
    if distributed():
        dist.all_reduce(sums)
    model.train(was_training)
    loss, top1, top5, n = sums.tolist()
    n = max(n, 1.0)
    return {"eval_loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "eval_images": n}
