"""The admm phase: plain training with the ADMM component, whose plan file, messages and plot live here.

``admm`` is method code without I/O: this module hands it the data-parallel
group (:class:`trainer.ranks.TorchComm`), the tracker and the rank-aware logger,
fixes the phase's rank plan once in ``phase<i>/rank_plan.json`` (the first start
plans from the weights it has, a resume and the decompose phase read it back),
and draws the per-layer residual plot when the phase ends.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from admm.admm_component import AdmmComponent
from trainer.context import WorkerContext
from trainer.core.component import Component
from trainer.logs import get_logger
from trainer.phases.plan_file import PLAN_FILE, load_plan, save_plan
from trainer.phases.training import TrainingPhase, TrainingRun
from trainer.ranks import TorchComm
from trainer.tracking.plots import plot_series

logger = get_logger(__name__)


def _layer_prefixed(log: Callable[[dict[str, float], int], None]) -> Callable[[dict[str, float], int], None]:
    """``log`` with per-layer series (keys with a '/', e.g. primal/layer1.0.conv1) moved under ``layers/``,
    so MLflow's default charts show the few global metrics and the per-layer ones sit in their own section."""
    return lambda metrics, step: log({f"layers/{k}" if "/" in k else k: v for k, v in metrics.items()}, step)


def admm_component(ctx: WorkerContext, index: int, model: nn.Module) -> AdmmComponent:
    """The ADMM component of phase ``index`` for this rank, its plan fixed in the phase directory."""
    cfg, tracker = ctx.cfg, ctx.phase_trackers[index]
    path = ctx.run_dir / f"phase{index}" / PLAN_FILE
    stored = load_plan(path, cfg.compression)
    comp = AdmmComponent.create(model, cfg.compression, cfg.admm, rank=ctx.rank, world=ctx.world,
                                grad_accum=cfg.optim.grad_accum, log=_layer_prefixed(tracker.metrics),
                                input_shape=(1, 3, ctx.image_size, ctx.image_size), fixed=stored,
                                comm=TorchComm(ctx.device), say=logger.info)
    if stored is None and ctx.rank == 0:
        table = save_plan(path, comp.plan, cfg.compression)
        logger.info(f"[admm] rank plan ({comp.plan.allocation} allocation) from the weights this phase starts "
                    f"from:\n{comp.plan.table()}")
        tracker.artifact(table)
    return comp


class AdmmPhase(TrainingPhase):
    """Training under the rank constraints: the ADMM component rides on the shared loop."""

    def components(self, model: nn.Module) -> list[Component]:
        self.admm = admm_component(self.ctx, self.index, model)
        return [self.admm, *super().components(model)]

    def finish(self, run: TrainingRun) -> None:
        if self.ctx.rank != 0 or not self.admm.history:
            return
        history = self.admm.history
        path = self.ctx.run_dir / f"phase{self.index}" / "admm_primal_residuals.png"
        plot_series(path, {name: [h[name] for h in history] for name in history[0]}, xlabel="Z-update",
                    ylabel="||W - Z|| / ||W||", title="ADMM primal residual per layer", log_y=True,
                    legend=len(history[0]) <= 24)
        run.tracker.artifact(Path(path))
