"""The accuracy and size of the model a run starts from (``model.init``), logged before its first phase."""
from __future__ import annotations

from torch import nn

from trainer.context import WorkerContext
from trainer.core.engine import resolve_precision
from trainer.core.loop import evaluate
from trainer.logs import get_logger
from trainer.phases.decompose import measured_flops

logger = get_logger(__name__)


def report_init_accuracy(ctx: WorkerContext, model: nn.Module) -> dict[str, float]:
    """Evaluate the freshly initialised model once; logged as ``init_top1``/``init_top5``/``init_eval_loss``
    on the parent run and the first phase's run (step 0): the dense baseline the compressed run started from.
    Its size too, ``init_params`` (all parameters) and ``init_flops`` (per image, FlopCounterMode, as the
    evaluate phase counts them), so a run whose first phase compresses without a decompose phase (rank_prune)
    still gets its compression ratios against the model it started from.
    """
    out = evaluate(model, ctx.eval_loader, device=ctx.device, precision=resolve_precision(ctx.cfg.engine, ctx.device))
    metrics = {"init_top1": out["top1"], "init_top5": out["top5"], "init_eval_loss": out["eval_loss"],
               "init_params": float(sum(p.numel() for p in model.parameters())),
               "init_flops": float(measured_flops(model, (1, 3, ctx.image_size, ctx.image_size)))}
    for t in (ctx.parent, ctx.phase_trackers[0]):
        t.metrics(metrics, 0)
    logger.info(f"[init] the initial model: top1 {out['top1']:.2f}% top5 {out['top5']:.2f}% on "
                f"{int(out['eval_images'])} images")
    return metrics
