"""The ADMM phase through the pipeline (local backend): residuals fall, metrics and plot are logged, state resumes."""
from __future__ import annotations

import json

import pytest
import torch

from admm.admm_component import ADMM_GROUP, AdmmComponent
from admm.config import AdmmConfig, CompressionConfig
from admm.planning.model_plan import plan_for_model
from launcher.run import pipeline
from trainer.checkpoints import files as ckpt
from trainer.core.engine import param_groups
from trainer.core.faults import InjectedFailure
from trainer.models import build_model
from trainer.tracking import tracker as tracking

# tinycnn with every layer planned as SVD (its layers are narrow: min_channels 3).
SMALL_SVD = CompressionConfig(format="svd", keep_ratio=0.6, exclude=[], min_channels=3)
HALF_SVD = CompressionConfig(format="svd", keep_ratio=0.5, exclude=[], min_channels=3)

ADMM = ("model.name=resnet20", "compression.format=tucker2", "compression.keep_ratio=0.5",
        "admm.rho=0.3", "admm.rho_growth=1.3", "admm.rho_max=10", "optim.lr=0.05",
        "phases=[{kind: pretrain, epochs: 1, steps_per_epoch: 8}, {kind: admm, epochs: 4, steps_per_epoch: 8}]")


def test_primal_residual_falls_on_real_cifar(tiny):
    info = pipeline.run(tiny(*ADMM))
    client = tracking.client(info.tracking_uri)
    admm_run = info.phase_ids[1]
    primal = [m.value for m in client.get_metric_history(admm_run, "admm_primal")]
    decomp = [m.value for m in client.get_metric_history(admm_run, "admm_decomp_err")]
    rho = [m.value for m in client.get_metric_history(admm_run, "rho")]
    assert len(primal) == 5  # the start, then 4 Z-updates
    assert primal[-1] < 0.5 * primal[0], primal  # W is pulled onto the low-rank set
    assert decomp[-1] < decomp[0], decomp  # decomposing now would lose less than at the start
    assert rho == sorted(rho) and rho[-1] > rho[0]
    run = client.get_run(admm_run)
    assert "layers/primal/layer1.0.conv1" in run.data.metrics and "layers/dual/layer3.2.conv2" in run.data.metrics
    assert "admm_primal_residuals.png" in [a.path for a in client.list_artifacts(admm_run)]
    # The plan was printed and stored before training, one row per planned layer.
    plan = json.loads((info.dir / "rank_plan.json").read_text())
    planned = [row["name"] for row in plan["layers"]]
    assert planned and all(row["fmt"] == "tucker2" for row in plan["layers"])
    assert (info.dir / "rank_plan.txt").read_text().count("tucker2") == len(planned)
    # ADMM state is in the checkpoint: Z and U of every planned layer, and the Z-update count.
    comp = ckpt.load_rank(ckpt.latest_checkpoint(info.dir / "checkpoints"), 0)["admm"]
    assert sorted(comp["layers"]) == sorted(planned) and comp["updates"] == 4


def test_admm_resume_mid_phase_matches(tiny):
    # Resume exactness needs a cut between two Z-updates, not a long run: 3 ADMM epochs of 4 steps, cut after
    # the 2nd (ResNet-20 for its BatchNorm buffers, tucker2 for the HOOI factors kept with Z and U).
    short = ("phases=[{kind: pretrain, epochs: 1, steps_per_epoch: 4}, {kind: admm, epochs: 3, steps_per_epoch: 4}]",)
    full = pipeline.run(tiny(*ADMM, *short, "run_name=full"))
    fail = ("debug.fail_at.phase=1", "debug.fail_at.epoch=2")
    with pytest.raises(InjectedFailure, match="debug.fail_at"):
        pipeline.run(tiny(*ADMM, *short, *fail, "run_name=cut"))
    cut = pipeline.run(tiny(*ADMM, *short, *fail, "run_name=cut", "resume=true"))  # fails only once
    a_dir, b_dir = (ckpt.latest_checkpoint(i.dir / "checkpoints") for i in (full, cut))
    a, b = (ckpt.load_shared(d)["model"]["weights"] for d in (a_dir, b_dir))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    za, zb = (ckpt.load_rank(d, 0)["admm"] for d in (a_dir, b_dir))
    assert za["rho"] == zb["rho"] and za["updates"] == zb["updates"] == 3  # one Z-update per epoch
    for name in za["layers"]:
        for key in ("z", "u"):
            torch.testing.assert_close(za["layers"][name][key], zb["layers"][name][key], rtol=0, atol=1e-5)


def test_decomposition_error_every_n_updates():
    """admm.decomp_every=2: the extra projection (and its metric) only on every second Z-update."""
    logged: list[dict] = []
    model = build_model("tinycnn", 10)
    comp = AdmmComponent(plan_for_model(model, SMALL_SVD), AdmmConfig(decomp_every=2), rank=0, world=1,
                         grad_accum=1, log=lambda m, s: logged.append(m))
    comp.prepare(model, 5e-4)
    comp.attach(model)
    comp.z_update(1)
    comp.z_update(2)
    assert "admm_decomp_err" not in logged[1] and "admm_decomp_err" in logged[2]
    assert all("admm_primal" in m for m in logged)


@pytest.mark.parametrize("nesterov", [False, True])
def test_penalty_through_weight_decay_equals_penalty_in_the_hook(nesterov):
    """rho W as the ADMM group's weight decay + rho V in the hook == rho (W + V) in the hook, step for step."""
    admm_cfg = AdmmConfig(rho=0.5, rho_growth=2.0, rho_max=10.0)  # large: the penalty dominates
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    weights = []
    for via_decay in (False, True):
        torch.manual_seed(0)
        model = build_model("tinycnn", 10)
        comp = AdmmComponent(plan_for_model(model, SMALL_SVD), admm_cfg, rank=0, world=1, grad_accum=1,
                             log=lambda m, s: None)
        admm_group = comp.prepare(model, 5e-4)
        groups = param_groups(model, 5e-4, admm_group if via_decay else ())
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=nesterov)
        comp.attach(model, optimizer=opt if via_decay else None)
        for step in range(6):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 2:
                comp.z_update(step)  # rho doubles: the group's weight decay must follow
        admm_groups = [g for g in opt.param_groups if g.get(ADMM_GROUP)]
        assert len(admm_groups) == (1 if via_decay else 0)
        if via_decay:
            assert admm_groups[0]["weight_decay"] == pytest.approx(5e-4 + 1.0)  # rho 0.5 -> 1.0 at the Z-update
        comp.detach()
        if via_decay:
            assert admm_groups[0]["weight_decay"] == 5e-4  # back to the base after the phase
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in weights[0]:
        torch.testing.assert_close(weights[1][k], weights[0][k], rtol=1e-5, atol=1e-6)
    # every weight of tinycnn is planned here: no empty decay group is passed on (DeepSpeed would drop it)
    groups = param_groups(model, 5e-4, [{"params": comp.penalized_params(model), "weight_decay": 5e-4}])
    assert [len(g["params"]) for g in groups] == [3, 3]


def test_attach_refuses_an_optimizer_without_the_admm_group():
    model = build_model("tinycnn", 10)
    comp = AdmmComponent(plan_for_model(model, HALF_SVD), AdmmConfig(), rank=0, world=1, grad_accum=1,
                         log=lambda m, s: None)
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1)
    with pytest.raises(RuntimeError, match="needs prepare"):
        comp.attach(model, optimizer=opt)
    comp.prepare(model, 5e-4)
    with pytest.raises(ValueError, match="extra_groups=component.prepare"):
        comp.attach(model, optimizer=opt)
    with pytest.raises(ValueError, match="not the one prepare"):
        comp.attach(build_model("tinycnn", 10))


@pytest.mark.parametrize("stage", [1, 2])
def test_admm_under_zero_matches_stage0(tiny, stage):
    """ZeRO 1/2 keep the ADMM param group's weight decay (base + rho) on their flat partitions."""
    tiny_admm = ("model.name=tinycnn", "compression.format=svd", "compression.keep_ratio=0.6",
                 "compression.exclude=[]", "compression.min_channels=3", "admm.rho=0.5", "admm.rho_growth=2",
                 "admm.rho_max=10", "admm.unit=step", "admm.interval=2",
                 "phases=[{kind: admm, epochs: 1, steps_per_epoch: 6}]")
    ref = pipeline.run(tiny(*tiny_admm, "run_name=admm_z0"))
    other = pipeline.run(tiny(*tiny_admm, f"run_name=admm_z{stage}", f"engine.zero_stage={stage}"))
    a, b = (ckpt.load_shared(ckpt.latest_checkpoint(i.dir / "checkpoints"))["model"]["weights"] for i in (ref, other))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # and the penalty acted: the same run with a negligible rho ends elsewhere
    weak = pipeline.run(tiny(*tiny_admm, "run_name=admm_weak", "admm.rho=1e-6", "admm.rho_max=1e-6"))
    c = ckpt.load_shared(ckpt.latest_checkpoint(weak.dir / "checkpoints"))["model"]["weights"]
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-3


def test_penalty_hooks_run_before_zero_gradient_hooks():
    """ZeRO 2 copies each gradient into its reduce bucket from a post-accumulate hook; the penalty goes first.

    Such hooks run in the order they were registered, so ``prepare`` (before the engine) must
    put the component's hook first. Checked by its effect: with a loss whose gradient is zero,
    one plain SGD step under ZeRO 2 must move every planned weight by exactly
    lr ((base + rho) W + rho V); a hook that ran after ZeRO's copy would lose the rho V part.
    """
    from cluster.ray_runtime import init_local_group
    from trainer.config import EngineConfig, OptimConfig
    from trainer.core.engine import Precision, build_engine

    init_local_group(gpu=False)
    torch.manual_seed(0)
    model = build_model("tinycnn", 10)
    comp = AdmmComponent(plan_for_model(model, HALF_SVD), AdmmConfig(rho=0.7), rank=0, world=1, grad_accum=1,
                         log=lambda m, s: None)
    groups = comp.prepare(model, 5e-4)
    optim = OptimConfig(lr=0.1, momentum=0.0, nesterov=False, weight_decay=5e-4, fused=False)
    engine = build_engine(model, optim, EngineConfig(zero_stage=2), batch_size=2, lr=0.1, total_steps=1,
                          steps_per_epoch=1, world_size=1, precision=Precision(False, False), extra_groups=groups)
    comp.attach(engine.module, optimizer=engine.optimizer)
    names = [p.name for p in comp.plan.layers]
    modules = dict(engine.module.named_modules())
    before = [modules[n].weight.detach().clone() for n in names]
    v = [comp.state.layers[n].v.clone() for n in names]
    assert all(float(x.abs().max()) > 0 for x in v)  # V = U - Z = -Proj(W) is not zero
    loss = engine(torch.randn(2, 3, 32, 32)).sum() * 0  # no data gradient: only the penalty moves W
    engine.backward(loss)
    engine.step()
    for n, w0, vn in zip(names, before, v):
        expected = w0 - 0.1 * ((5e-4 + 0.7) * w0 + 0.7 * vn)
        torch.testing.assert_close(modules[n].weight.detach(), expected, rtol=1e-5, atol=1e-6)


def test_penalty_switches_on_and_off_with_attach_and_detach():
    """Between attach and detach the owned weights' .grad gains rho (W + V) in place; otherwise nothing."""
    torch.manual_seed(0)
    model = build_model("tinycnn", 10)
    comp = AdmmComponent(plan_for_model(model, HALF_SVD), AdmmConfig(rho=0.7), rank=0, world=1, grad_accum=1,
                         log=lambda m, s: None)
    (group,) = comp.prepare(model, 5e-4)
    weights = group["params"]

    def penalty_grads() -> list[torch.Tensor]:
        for w in weights:
            w.grad = None
        sum((w * 0).sum() for w in weights).backward()  # the loss adds nothing: .grad is the hook's term
        return [w.grad.clone() for w in weights]

    assert all(float(g.abs().max()) == 0 for g in penalty_grads())  # prepared, not attached: off
    comp.attach(model)  # no optimizer: the hook adds rho (W + V)
    expected = [0.7 * (w.detach() + comp.state.layers[n].v) for w, n in zip(weights, comp.state.layers)]
    for got, want in zip(penalty_grads(), expected):
        torch.testing.assert_close(got, want)
    comp.detach(keep_hooks=True)
    assert all(float(g.abs().max()) == 0 for g in penalty_grads())
    comp.attach(model)
    torch.testing.assert_close(penalty_grads()[0], expected[0])
    comp.detach()  # removes the hooks: a later attach needs prepare again, and .grad gets nothing
    assert all(float(g.abs().max()) == 0 for g in penalty_grads())
    with pytest.raises(RuntimeError, match="needs prepare"):
        comp.attach(model)
