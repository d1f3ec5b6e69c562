"""Knowledge distillation from a frozen dense teacher during a training phase (``phases.N.distill``).

The teacher is the dense model the driver resolved (``distill.teacher``: model.init's weights, or a
run, checkpoint or weights file; a pinned copy in the run directory, see
:mod:`launcher.run.teacher_source`). Every worker builds it in its own process on its own device at the
start of the phase (also on resume: it holds no state, so a resumed phase sees the same teacher),
keeps it in eval mode (BatchNorm uses its running statistics) with no gradients, and runs it on the
same micro-batch as the student, under the same precision. The loss replaces the label loss of the
train loop (``train_epoch(loss_fn=...)``)::

    loss = (1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

averaged over the batch; T^2 keeps the soft term's gradient on the scale of the hard one's
(Hinton et al. 2015, "Distilling the Knowledge in a Neural Network").
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import DistillConfig
from trainer.core.engine import Precision
from trainer.init_weights import InitSource, apply_init
from trainer.models import build_model

if TYPE_CHECKING:
    from trainer.context import WorkerContext


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, *, alpha: float,
                      temperature: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor]:
    """The distillation loss of one batch, computed in fp32.

    Args:
        student, teacher: logits, (batch, classes); only ``student`` carries gradients.
        labels: class indices, (batch,).
    Returns:
        ``(loss, soft, hard)``: the weighted total, the soft term T^2 * KL (batch mean, nats) and the
        label cross-entropy (batch mean, with ``label_smoothing``); the last two unweighted.
    """
    s = student.float()
    t = teacher.detach().float()
    hard = F.cross_entropy(s, labels, label_smoothing=label_smoothing)
    soft = F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature ** 2
    return (1 - alpha) * hard + alpha * soft, soft, hard


def build_teacher(source: InitSource, model_name: str, num_classes: int, device: torch.device) -> nn.Module:
    """The frozen teacher: ``model_name`` with ``source``'s weights (sha256 checked), in eval mode, on ``device``."""
    teacher = apply_init(build_model(model_name, num_classes), source).to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class DistillLoss:
    """The train loop's loss with a teacher in it: ``loss_fn(student_logits, x, y) -> loss``.

    The soft and hard terms are summed on the device and read only when the loop logs
    (:meth:`pop_metrics`), so distillation adds no host synchronisation per step.
    """

    def __init__(self, teacher: nn.Module, cfg: DistillConfig, precision: Precision, label_smoothing: float) -> None:
        self.teacher, self.cfg, self.label_smoothing = teacher, cfg, label_smoothing
        device = next(teacher.parameters()).device
        # The student's forward runs under DeepSpeed's bf16 autocast when precision.bf16; the teacher
        # runs outside the engine, so it gets the same autocast here.
        self._autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision.bf16 \
            else contextlib.nullcontext
        self._sums = torch.zeros(3, device=device)  # soft, hard, micro-batches

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.teacher(x)

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss, soft, hard = distillation_loss(logits, self.teacher_logits(x), y, alpha=self.cfg.alpha,
                                             temperature=self.cfg.temperature, label_smoothing=self.label_smoothing)
        self._sums += torch.stack([soft.detach(), hard.detach(), torch.ones((), device=self._sums.device)])
        return loss

    def pop_metrics(self) -> dict[str, float]:
        """Mean soft term (``distill_loss``) and label loss (``label_loss``) since the last call."""
        soft, hard, n = self._sums.tolist()
        self._sums.zero_()
        return {"distill_loss": soft / n, "label_loss": hard / n} if n else {}


def phase_loss(ctx: WorkerContext, index: int, precision: Precision) -> DistillLoss | None:
    """The distillation loss of phase ``index`` (its teacher built on this worker), or None without ``distill``."""
    cfg = ctx.cfg.phases[index].distill
    if cfg is None:
        return None
    source = ctx.teachers.get(cfg.teacher)
    if source is None:  # the driver resolves every phase's teacher; a job without it was not built by it
        raise RuntimeError(f"phases.{index}.distill.teacher: {cfg.teacher!r} was not resolved by the driver")
    teacher = build_teacher(source, cfg.model or ctx.cfg.model.name, ctx.num_classes, ctx.device)
    if ctx.rank == 0:
        print(f"[distill] teacher {cfg.model or ctx.cfg.model.name} from {source.describe()}, alpha {cfg.alpha}, "
              f"T {cfg.temperature}", flush=True)
    return DistillLoss(teacher, cfg, precision, ctx.cfg.optim.label_smoothing)
