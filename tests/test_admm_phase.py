"""The ADMM phase through the pipeline (local backend): residuals fall, metrics and plot are logged, state resumes."""
from __future__ import annotations

import pytest
import torch

from launcher import pipeline
from launcher.schema import CompressionConfig, Config
from trainer import checkpoint as ckpt
from trainer import tracking

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
    assert "primal/layer1.0.conv1" in run.data.metrics and "dual/layer3.2.conv2" in run.data.metrics
    assert "admm_primal_residuals.png" in [a.path for a in client.list_artifacts(admm_run)]
    # The plan was printed and stored before training.
    assert (info.dir / "rank_plan.txt").read_text().count("tucker2") == 18
    # ADMM state is in the checkpoint.
    comp = ckpt.load_rank(ckpt.latest_checkpoint(info.dir / "checkpoints"), 0)["components"][0]
    assert len(comp["layers"]) == 18 and comp["updates"] == 4


def test_admm_resume_mid_phase_matches(tiny, monkeypatch):
    full = pipeline.run(tiny(*ADMM, "run_name=full"))
    monkeypatch.setenv("TDC_FAIL_AT", "1:2")
    with pytest.raises(RuntimeError, match="injected"):
        pipeline.run(tiny(*ADMM, "run_name=cut"))
    monkeypatch.delenv("TDC_FAIL_AT")
    cut = pipeline.run(tiny(*ADMM, "run_name=cut", "resume=true"))
    a_dir, b_dir = (ckpt.latest_checkpoint(i.dir / "checkpoints") for i in (full, cut))
    a, b = ckpt.load_shared(a_dir)["model"], ckpt.load_shared(b_dir)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    za, zb = (ckpt.load_rank(d, 0)["components"][0] for d in (a_dir, b_dir))
    assert za["rho"] == zb["rho"] and za["updates"] == zb["updates"]
    for name in za["layers"]:
        for key in ("z", "u"):
            torch.testing.assert_close(za["layers"][name][key], zb["layers"][name][key], rtol=0, atol=1e-5)


def test_decomposition_error_every_n_updates():
    """admm.decomp_every=2: the extra projection (and its metric) only on every second Z-update."""
    from admm.component import AdmmComponent, plan_for_model
    from trainer.models import build_model

    cfg = Config(name="x")
    cfg.compression = CompressionConfig(format="svd", keep_ratio=0.6, exclude=[], min_channels=3)
    cfg.admm.decomp_every = 2
    logged: list[dict] = []
    model = build_model("tinycnn", 10)
    comp = AdmmComponent(plan_for_model(model, cfg.compression), cfg.admm, rank=0, world=1, grad_accum=1,
                         log=lambda m, s: logged.append(m))
    comp.prepare(model)
    comp.attach(model)
    comp.z_update(1)
    comp.z_update(2)
    assert "admm_decomp_err" not in logged[1] and "admm_decomp_err" in logged[2]
    assert all("admm_primal" in m for m in logged)


@pytest.mark.parametrize("nesterov", [False, True])
def test_penalty_through_weight_decay_equals_penalty_in_the_hook(nesterov):
    """rho W as the ADMM group's weight decay + rho V in the hook == rho (W + V) in the hook, step for step."""
    from admm.component import AdmmComponent, plan_for_model
    from trainer.engine import ADMM_GROUP, param_groups
    from trainer.models import build_model

    cfg = Config(name="x")
    cfg.compression = CompressionConfig(format="svd", keep_ratio=0.5, exclude=[], min_channels=3)
    cfg.admm.rho, cfg.admm.rho_growth, cfg.admm.rho_max = 0.5, 2.0, 10.0  # large: the penalty dominates
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    weights = []
    for via_decay in (False, True):
        torch.manual_seed(0)
        model = build_model("tinycnn", 10)
        comp = AdmmComponent(plan_for_model(model, cfg.compression), cfg.admm, rank=0, world=1, grad_accum=1,
                             log=lambda m, s: None)
        penalized = comp.prepare(model)
        groups = param_groups(model, 5e-4, penalized if via_decay else ())
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
    assert [len(g["params"]) for g in param_groups(model, 5e-4, comp.penalized_params(model))] == [3, 3]


def test_attach_refuses_an_optimizer_without_the_admm_group():
    from admm.component import AdmmComponent, plan_for_model
    from trainer.engine import param_groups
    from trainer.models import build_model

    cfg = Config(name="x")
    cfg.compression = CompressionConfig(format="svd", keep_ratio=0.5, exclude=[], min_channels=3)
    model = build_model("tinycnn", 10)
    comp = AdmmComponent(plan_for_model(model, cfg.compression), cfg.admm, rank=0, world=1, grad_accum=1,
                         log=lambda m, s: None)
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1)
    with pytest.raises(RuntimeError, match="needs prepare"):
        comp.attach(model, optimizer=opt)
    comp.prepare(model)
    with pytest.raises(ValueError, match="penalized=component.prepare"):
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
    a, b = (ckpt.load_shared(ckpt.latest_checkpoint(i.dir / "checkpoints"))["model"] for i in (ref, other))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # and the penalty acted: the same run with a negligible rho ends elsewhere
    weak = pipeline.run(tiny(*tiny_admm, "run_name=admm_weak", "admm.rho=1e-6", "admm.rho_max=1e-6"))
    c = ckpt.load_shared(ckpt.latest_checkpoint(weak.dir / "checkpoints"))["model"]
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-3


def test_penalty_hooks_run_before_zero_gradient_hooks():
    """ZeRO 2 copies each gradient into its reduce bucket from a post-accumulate hook; the penalty goes first.

    Such hooks run in the order they were registered, so ``prepare`` (before the engine)
    must put the component's hook first on every owned weight.
    """
    from cluster.ray_runtime import run_local

    def first_hooks(_payload):
        from admm.component import AdmmComponent, plan_for_model
        from trainer.engine import Precision, build_engine
        from trainer.models import build_model

        cfg = Config(name="x")
        cfg.cluster.use_gpu = "no"
        cfg.engine.zero_stage = 2
        cfg.compression = CompressionConfig(format="svd", keep_ratio=0.5, exclude=[], min_channels=3)
        model = build_model("tinycnn", 10)
        comp = AdmmComponent(plan_for_model(model, cfg.compression), cfg.admm, rank=0, world=1, grad_accum=1,
                             log=lambda m, s: None)
        penalized = comp.prepare(model)
        build_engine(model, cfg, lr=0.1, total_steps=1, steps_per_epoch=1, world_size=1,
                     precision=Precision(False, False), penalized=penalized)
        return [[h.__qualname__ for h in w._post_accumulate_grad_hooks.values()] for w in penalized]

    cfg = Config(name="x")
    cfg.cluster.use_gpu = "no"
    hooks = run_local(first_hooks, {}, cfg)
    assert len(hooks) == 3
    for names in hooks:
        assert len(names) == 2  # ours and DeepSpeed's
        assert names[0].startswith("AdmmComponent._make_hook")


def test_penalty_switches_on_and_off_with_attach_and_detach():
    """Between attach and detach the owned weights' .grad gains rho (W + V) in place; otherwise nothing."""
    from admm.component import AdmmComponent, plan_for_model
    from trainer.models import build_model

    cfg = Config(name="x")
    cfg.compression = CompressionConfig(format="svd", keep_ratio=0.5, exclude=[], min_channels=3)
    cfg.admm.rho = 0.7
    torch.manual_seed(0)
    model = build_model("tinycnn", 10)
    comp = AdmmComponent(plan_for_model(model, cfg.compression), cfg.admm, rank=0, world=1, grad_accum=1,
                         log=lambda m, s: None)
    weights = comp.prepare(model)

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
    comp.detach()
    assert all(len(w._post_accumulate_grad_hooks or {}) == 0 for w in weights)
    with pytest.raises(RuntimeError, match="needs prepare"):
        comp.attach(model)
