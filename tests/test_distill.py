"""Distillation from a frozen dense teacher (phases.N.distill): the loss, the config checks, a run that resumes."""
from __future__ import annotations

import pytest
import torch

from launcher.config import ConfigError
from launcher.run import pipeline
from trainer.checkpoints import files as ckpt
from trainer.config import DistillConfig
from trainer.core.distill import DistillLoss, distillation_loss
from trainer.core.engine import Precision
from trainer.models import build_model
from trainer.tracking import tracker as tracking

# tinycnn (no BatchNorm): decomposed at 0.6 of its parameters, fine-tuned 2 short epochs with the init as teacher.
DISTILL = ("compression.format=svd", "compression.keep_ratio=0.6", "compression.exclude=[]",
           "compression.min_channels=3",
           "phases=[{kind: decompose}, {kind: finetune, epochs: 2, steps_per_epoch: 3, "
           "distill: {alpha: 0.7, temperature: 3.0}}, {kind: evaluate}]")


def test_loss_is_the_hand_computed_kl_plus_ce():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    alpha, T = 0.3, 2.5
    p_t = torch.softmax(t.double() / T, dim=1)
    log_p_s = torch.log_softmax(s.double() / T, dim=1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(dim=1).mean() * T * T  # KL(teacher || student), batch mean, x T^2
    ce = -torch.log_softmax(s.double(), dim=1)[torch.arange(6), y].mean()
    loss, soft, hard = distillation_loss(s, t, y, alpha=alpha, temperature=T)
    assert soft.item() == pytest.approx(kl.item(), rel=1e-5)
    assert hard.item() == pytest.approx(ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx(((1 - alpha) * ce + alpha * kl).item(), rel=1e-5)
    # The teacher's logits never get a gradient; the student's soft gradient is (p_s - p_t) * T / batch.
    s_ = s.clone().requires_grad_()
    t_ = t.clone().requires_grad_()
    distillation_loss(s_, t_, y, alpha=1.0, temperature=T)[0].backward()
    assert t_.grad is None
    torch.testing.assert_close(s_.grad.double(), (torch.softmax(s.double() / T, 1) - p_t) * T / 6,
                               rtol=1e-4, atol=1e-6)


def test_distill_loss_runs_a_frozen_eval_mode_teacher_and_reports_its_terms():
    torch.manual_seed(0)
    teacher = build_model("resnet20", 10).eval().requires_grad_(False)
    student = build_model("resnet20", 10)
    stats = {k: v.clone() for k, v in teacher.state_dict().items()}
    fn = DistillLoss(teacher, DistillConfig(alpha=0.5, temperature=4.0), Precision(bf16=False, channels_last=False),
                     label_smoothing=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    logits = student(x)
    loss = fn(logits, x, y)
    expected, soft, hard = distillation_loss(logits, teacher(x), y, alpha=0.5, temperature=4.0, label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, stats[k]) for k, v in teacher.state_dict().items())  # BN running stats untouched
    fn(student(x), x, y)
    metrics = fn.pop_metrics()
    assert set(metrics) == {"distill_loss", "label_loss"} and metrics["distill_loss"] > 0
    assert fn.pop_metrics() == {}  # reset at every read
    assert fn.teacher_logits(x).dtype == torch.float32
    # Under bf16 the student runs in DeepSpeed's autocast; the teacher gets the same precision.
    bf16 = DistillLoss(teacher, DistillConfig(), Precision(bf16=True, channels_last=False), label_smoothing=0.0)
    assert bf16.teacher_logits(x).dtype == torch.bfloat16


@pytest.mark.parametrize("override, message", [
    ("phases=[{kind: decompose, distill: {}}, {kind: evaluate}]",
     r"phases\.0\.distill: is a setting of the phases pretrain, admm, finetune; got it on kind 'decompose'"),
    ("phases.1.distill.alpha=0", r"phases\.1\.distill\.alpha: must be in \(0, 1\]"),
    ("phases.1.distill.temperature=-1", r"phases\.1\.distill\.temperature: must be > 0"),
    ("phases.1.distill.model=vgg", r"phases\.1\.distill\.model: expected one of 'resnet20', .*'tinycnn' or null, got 'vgg'"),
    ("phases.1.distill.teacher=init", r"phases\.1\.distill\.teacher: 'init' takes the teacher from model\.init"),
])
def test_bad_distill_settings_name_the_field(tiny, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny(*DISTILL, override)


def test_a_teacher_that_does_not_fit_is_refused_on_the_driver(tiny, tmp_path):
    file = tmp_path / "tiny.pt"
    torch.save(build_model("tinycnn", 10).state_dict(), file)
    with pytest.raises(ConfigError, match=r"phases\.1\.distill\.teacher: .*missing key"):
        pipeline.run(tiny(*DISTILL, f"model.init={file}", "phases.1.distill.model=resnet20"))
    with pytest.raises(ConfigError, match=r"phases\.1\.distill\.teacher: .* does not exist"):
        pipeline.run(tiny(*DISTILL, f"model.init={file}", f"phases.1.distill.teacher={tmp_path / 'nowhere.pt'}"))
    assert not (tmp_path / "runs").exists()  # nothing started


def _final(info) -> dict[str, torch.Tensor]:
    return ckpt.load_shared(ckpt.latest_checkpoint(info.dir / "checkpoints"))["model"]["weights"]


def test_finetune_with_distill_resumes_with_the_pinned_teacher(tiny, tmp_path):
    """Cut after the first fine-tuning epoch, the teacher's source file replaced by NaNs, resumed: the same
    final model as the uninterrupted run (the resume rebuilt the teacher from the run's own copy)."""
    from trainer.core.faults import InjectedFailure

    torch.manual_seed(5)
    file = tmp_path / "dense.pt"
    dense = build_model("tinycnn", 10).state_dict()
    dense["fc.weight"] *= 30  # a confident teacher: a random one's near-uniform outputs would make the soft term ~0
    torch.save(dense, file)
    full = pipeline.run(tiny(*DISTILL, f"model.init={file}", "run_name=full"))
    client = tracking.client(full.tracking_uri)
    history = client.get_metric_history(full.phase_ids[1], "distill_loss")
    assert [m.step for m in history] == [2, 3, 4, 6] and all(m.value > 0.01 for m in history)
    assert client.get_run(full.phase_ids[1]).data.metrics["label_loss"] > 0
    assert client.get_run(full.parent_id).data.tags["tdcompress.teacher.sha256"] == ckpt.file_digest(file)
    # alpha matters: the same run without the soft term ends elsewhere
    plain = pipeline.run(tiny(*DISTILL, f"model.init={file}", "run_name=plain", "phases.1.distill=null"))
    assert any(not torch.equal(a, b) for a, b in zip(_final(full).values(), _final(plain).values()))

    with pytest.raises(InjectedFailure):
        pipeline.run(tiny(*DISTILL, f"model.init={file}", "run_name=cut", "debug.fail_at={phase: 1, epoch: 1}"))
    torch.save({k: torch.full_like(v, float("nan")) for k, v in build_model("tinycnn", 10).state_dict().items()},
               file)
    resumed = pipeline.run(tiny(*DISTILL, f"model.init={file}", "run_name=cut", "resume=true"))
    a, b = _final(full), _final(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from cluster.config import ClusterConfig
    from cluster.ray_runtime import ensure_ray

    ensure_ray(ClusterConfig())
    yield
    ray.shutdown()


@pytest.mark.ray
def test_distill_on_two_ray_workers_restarts_and_matches_one_worker(tiny, tmp_path, ray_local):
    """Two gloo workers, rank 1 failing after the first fine-tuning epoch: Ray restarts the group, which
    resumes from the checkpoint with the teacher rebuilt in each worker; the result is the 1-worker run's."""
    torch.manual_seed(5)
    file = tmp_path / "dense.pt"
    dense = build_model("tinycnn", 10).state_dict()
    dense["fc.weight"] *= 30
    torch.save(dense, file)
    two = pipeline.run(tiny(*DISTILL, f"model.init={file}", "run_name=two", "cluster.backend=ray",
                            "cluster.num_workers=2", "cluster.max_failures=1",
                            "debug.fail_at={phase: 1, epoch: 1, rank: 1}"))
    assert (two.dir / "injected-failure-1-1").exists()
    path = ckpt.latest_checkpoint(two.dir / "checkpoints")
    assert ckpt.read_meta(path)["world_size"] == 2
    prints = [ckpt.load_rank(path, r)["fingerprint"] for r in range(2)]
    assert torch.equal(prints[0], prints[1]), "replicas diverged"
    one = pipeline.run(tiny(*DISTILL, f"model.init={file}", "run_name=one"))
    a, b = _final(one), _final(two)
    for k in a:  # gloo's average vs one rank's mean: equal up to summation order
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    history = tracking.client(two.tracking_uri).get_metric_history(two.phase_ids[1], "distill_loss")
    assert history and all(m.value > 0.01 for m in history)
