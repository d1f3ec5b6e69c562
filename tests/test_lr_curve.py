"""optim.schedule: per_phase (each training phase its own cosine) or one_curve (ADMM and fine-tuning on one)."""
from __future__ import annotations

import pytest
import torch

from launcher.config import ConfigError
from launcher.run import pipeline
from trainer.checkpoints import files as ckpt
from trainer.core.engine import warmup_cosine
from trainer.core.lr_curve import phase_curve
from trainer.tracking import tracker as tracking

# tinycnn: 2 ADMM epochs of 4 steps, decompose, 2 fine-tuning epochs of 3 steps (14 steps in all), lr logged every step.
ADMM_FT = ("compression.format=svd", "compression.keep_ratio=0.6", "compression.exclude=[]",
           "compression.min_channels=3", "admm.rho=0.01", "log_every=1", "optim.warmup_epochs=0.5",
           "optim.min_lr_ratio=0.1", "optim.lr=0.05",
           "phases=[{kind: admm, epochs: 2, steps_per_epoch: 4}, {kind: decompose}, "
           "{kind: finetune, epochs: 2, steps_per_epoch: 3}, {kind: evaluate}]")


def test_phase_curve_spans(tiny):
    cfg = tiny(*ADMM_FT, "phases.2.lr=0.01")
    steps = [4, 4, 3, 3]
    admm, ft = phase_curve(cfg, 0, steps), phase_curve(cfg, 2, steps)
    assert (admm.peak_lr, admm.start_step, admm.total_steps) == (0.05, 0, 8)
    assert (ft.peak_lr, ft.start_step, ft.total_steps, ft.warmup_steps_per_epoch) == (0.01, 0, 6, 3)
    one = tiny(*ADMM_FT, "optim.schedule=one_curve")
    admm, ft = phase_curve(one, 0, steps), phase_curve(one, 2, steps)
    assert (admm.peak_lr, admm.start_step, admm.total_steps) == (0.05, 0, 14)
    assert (ft.peak_lr, ft.start_step, ft.total_steps, ft.warmup_steps_per_epoch) == (0.05, 8, 14, 4)


@pytest.mark.parametrize("overrides, message", [
    (("optim.schedule=one_curve", "phases.2.lr=0.01"),
     r"phases\.2\.lr: with optim\.schedule=one_curve the training phases share one curve"),
    (("optim.schedule=cosine",), r"optim\.schedule: 'cosine' is not allowed; allowed values: 'per_phase', 'one_curve'"),
    (("optim.schedule=one_curve", "phases=[{kind: rank_prune, epochs: 1}, {kind: finetune}]"),
     r"optim\.schedule: one_curve is not available with a rank_prune phase"),
])
def test_bad_schedule_settings_name_the_field(tiny, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(*ADMM_FT, *overrides)


def _lr_series(info) -> list[tuple[int, float]]:
    """(global step, lr) of every training phase's run, on the run's one step axis."""
    client = tracking.client(info.tracking_uri)
    return sorted((m.step, m.value) for i in (0, 2) for m in client.get_metric_history(info.phase_ids[i], "lr"))


def test_one_curve_continues_from_admm_into_finetune_and_resumes(tiny):
    from trainer.core.faults import InjectedFailure

    full = pipeline.run(tiny(*ADMM_FT, "optim.schedule=one_curve", "run_name=full"))
    series = _lr_series(full)
    assert [s for s, _ in series] == list(range(1, 15))  # logged after each step g: the rate of step g + 1
    curve = warmup_cosine(14, 2, 0.1)  # warmup 0.5 epoch of the first phase's 4 steps
    for step, lr in series:
        assert lr == pytest.approx(0.05 * curve(step), rel=1e-6), step
    admm_last, ft_first = series[7][1], series[8][1]
    assert ft_first < admm_last  # fine-tuning went on down the same cosine, no restart
    assert series[-1][1] == pytest.approx(0.05 * 0.1)  # the floor, at the end of the last training phase

    per_phase = _lr_series(pipeline.run(tiny(*ADMM_FT, "run_name=per_phase")))
    assert per_phase[8][1] > per_phase[7][1]  # per_phase: fine-tuning restarts its own cosine

    with pytest.raises(InjectedFailure):
        pipeline.run(tiny(*ADMM_FT, "optim.schedule=one_curve", "run_name=cut", "debug.fail_at={phase: 2, epoch: 1}"))
    resumed = pipeline.run(tiny(*ADMM_FT, "optim.schedule=one_curve", "run_name=cut", "resume=true"))
    again = _lr_series(resumed)  # the same MLflow runs, continued: every step once, on the same curve
    assert [s for s, _ in again] == [s for s, _ in series]
    assert [lr for _, lr in again] == pytest.approx([lr for _, lr in series], rel=1e-9)
    a, b = (ckpt.load_shared(ckpt.latest_checkpoint(i.dir / "checkpoints"))["model"]["weights"] for i in (full, resumed))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
