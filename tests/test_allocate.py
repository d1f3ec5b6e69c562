"""Non-uniform ranks from one budget (admm.planning.allocate), 1x1 layers under tucker2 planned as svd, `tdcompress plan`."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from admm.admm_component import AdmmComponent
from admm.config import CompressionConfig
from admm.formats.projections import project_svd, project_tucker2
from admm.planning.allocate import Ladder, allocate, relative_errors, svd_errors, tucker2_errors
from admm.planning.layer_info import describe_layers
from admm.planning.model_plan import plan_for_model
from admm.planning.planner import error_ladder, select
from admm.planning.rank_plan import RankPlan
from trainer.phases.plan_file import PLAN_FILE, load_plan, save_plan


def _decaying(shape: tuple[int, ...], decay: float, seed: int) -> torch.Tensor:
    """A weight whose out-channel spectrum decays like decay**i (layers with different decays differ in how
    much rank they need, as trained layers do)."""
    g = torch.Generator().manual_seed(seed)
    c_out = shape[0]
    rest = int(torch.tensor(shape[1:]).prod())
    u, _ = torch.linalg.qr(torch.randn(c_out, c_out, generator=g))
    v, _ = torch.linalg.qr(torch.randn(rest, c_out, generator=g))
    s = decay ** torch.arange(c_out, dtype=torch.float32)
    return ((u * s) @ v.T).reshape(shape)


class Net(nn.Module):
    """Six 3x3 convs (16..32 channels) and one 1x1 conv; no BN: only the weights matter here."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, padding=1)
        self.c = nn.Conv2d(32, 32, 3, padding=1)
        self.d = nn.Conv2d(32, 32, 3, padding=1)
        self.e = nn.Conv2d(32, 32, 3, padding=1)
        self.pw = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in (self.stem, self.a, self.b, self.c, self.d, self.e, self.pw):
            x = torch.relu(m(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def net() -> Net:
    """Layer-varying spectra: from fast decay (needs little rank) to almost flat (needs much)."""
    model = Net()
    with torch.no_grad():
        for i, (name, decay) in enumerate([("a", 0.5), ("b", 0.97), ("c", 0.7), ("d", 0.99), ("e", 0.85),
                                           ("pw", 0.9)]):
            m = getattr(model, name)
            m.weight.copy_(_decaying(tuple(m.weight.shape), decay, seed=i))
    return model


def _cfg(**kw) -> CompressionConfig:
    return CompressionConfig(**{"exclude": ["stem", "fc"], "keep_ratio": 0.4, **kw})


def _ladders(model: nn.Module, cfg: CompressionConfig):
    layers = describe_layers(model)
    planned = select(layers, cfg.include, cfg.exclude, cfg.min_channels)
    mods = dict(model.named_modules())
    from admm.planning.planner import layer_format

    return planned, [error_ladder(layer, layer_format(layer.shape, cfg.format), mods[layer.name].weight,
                                  rank_multiple=cfg.rank_multiple, min_rank_ratio=cfg.min_rank_ratio,
                                  max_keep=cfg.max_keep) for layer in planned]


def test_closed_form_errors_match_projections():
    w = _decaying((24, 16, 3, 3), 0.8, seed=3)
    energy = float(w.square().sum())
    for r, e in zip([1, 5, 12], svd_errors(w, [1, 5, 12])):
        assert e == pytest.approx(float((w - project_svd(w, r)).square().sum()) / energy, rel=1e-4, abs=1e-7)
    for (a, b), e in zip([(3, 2), (10, 7), (24, 16)], tucker2_errors(w, [(3, 2), (10, 7), (24, 16)])):
        hosvd = float((w - project_tucker2(w, (a, b), n_iter=0)).square().sum()) / energy
        assert e == pytest.approx(hosvd, rel=1e-3, abs=1e-7)
        hooi = float((w - project_tucker2(w, (a, b))).square().sum()) / energy
        assert hooi <= e + 1e-6  # HOOI sweeps only lower it: the estimate is an upper bound for them


@pytest.mark.parametrize("fmt", ["svd", "tucker2"])
def test_error_allocation_beats_uniform_at_the_same_budget(net, fmt):
    uniform = plan_for_model(net, _cfg(format=fmt, allocation="uniform"))
    error = plan_for_model(net, _cfg(format=fmt, allocation="error"))
    budget = 0.4 * error.dense_params_total
    assert error.params_after_total <= budget
    weights = {p.name: dict(net.named_modules())[p.name].weight for p in uniform.layers}
    u_err = sum(relative_errors(weights[p.name], p.fmt, [p.rank])[0] for p in uniform.layers)
    e_err = sum(relative_errors(weights[p.name], p.fmt, [p.rank])[0] for p in error.layers)
    assert e_err == pytest.approx(error.error_sum, rel=1e-6)
    assert e_err < 0.8 * u_err, (e_err, u_err)
    ranks = {p.name: p.rank for p in error.layers}
    first = lambda r: r[0] if isinstance(r, tuple) else r  # noqa: E731
    assert first(ranks["a"]) < first(ranks["d"])  # the fast-decaying layer needs less rank than the flat one


@pytest.mark.parametrize("fmt,multiple", [("svd", 1), ("tucker2", 1), ("svd", 4), ("tucker2", 4)])
def test_budget_met_within_one_rank_step(net, fmt, multiple):
    cfg = _cfg(format=fmt, allocation="error", rank_multiple=multiple)
    plan = plan_for_model(net, cfg)
    planned, ladders = _ladders(net, cfg)
    budget = 0.4 * plan.dense_params_total
    left = budget - plan.params_after_total
    assert left >= 0
    steps = []
    for layer, lad in zip(planned, ladders):
        i = lad.ranks.index(plan.by_name()[layer.name].rank)
        if i + 1 < len(lad.ranks):
            steps.append(lad.costs[i + 1] - lad.costs[i])
    assert steps and all(left < s for s in steps), (left, steps)  # no layer's next rank step fits what is left
    if multiple > 1:
        for p in plan.layers:
            for r in (p.rank if isinstance(p.rank, tuple) else (p.rank,)):
                assert r % multiple == 0 or r < multiple or r in p.shape[:2], (p.name, p.rank)


def test_allocation_is_deterministic(net):
    cfg = _cfg(format="tucker2", allocation="error")
    a, b = plan_for_model(net, cfg), plan_for_model(net, cfg)
    assert [(p.name, p.rank) for p in a.layers] == [(p.name, p.rank) for p in b.layers]
    ladders = [Ladder(ranks=(1, 2, 3), costs=(8, 16, 24), errors=(0.75, 0.5, 0.25))] * 3  # exact in binary
    # equal drops per parameter everywhere: ties go to the earlier layer, the same way every time
    assert allocate(ladders, 48) == [2, 1, 0] == allocate(ladders, 48)
    assert allocate(ladders, 40) == [2, 0, 0]


def test_hull_looks_past_a_flat_step():
    # Layer 0 gains nothing from its first step but much from its second; layer 1 gains a little per step.
    flat_then_steep = Ladder(ranks=(1, 2, 3), costs=(10, 20, 30), errors=(1.0, 1.0, 0.0))
    gentle = Ladder(ranks=(1, 2, 3), costs=(10, 20, 30), errors=(1.0, 0.8, 0.6))
    assert allocate([flat_then_steep, gentle], 40) == [2, 0]  # a one-step greedy would take gentle first
    with pytest.raises(ValueError, match="more than the budget"):
        allocate([gentle, gentle], 19)


def test_min_and_max_per_layer(net):
    plan = plan_for_model(net, _cfg(format="svd", allocation="error", min_rank_ratio=0.25, max_keep=0.6))
    for p in plan.layers:
        full = min(p.shape[0], p.shape[1] * p.shape[2] * p.shape[3])
        assert p.rank >= 0.25 * full, (p.name, p.rank)
        assert p.params_after <= 0.6 * p.params_before, (p.name, p.params_after)
    free = plan_for_model(net, _cfg(format="svd", allocation="error"))
    assert [p.rank for p in free.layers] != [p.rank for p in plan.layers]  # the limits did bind
    with pytest.raises(ValueError, match="min_rank_ratio"):
        plan_for_model(net, _cfg(format="svd", allocation="error", min_rank_ratio=0.9, keep_ratio=0.3))


def test_explicit_ranks_are_kept(net):
    plan = plan_for_model(net, _cfg(format="tucker2", allocation="error", ranks={"b": [5, 4]}))
    assert plan.by_name()["b"].rank == (5, 4)
    assert plan.params_after_total <= 0.4 * plan.dense_params_total


def test_one_by_one_under_tucker2_is_svd_in_table_and_surgery(net):
    from admm.nn.layers import SVDLayer, Tucker2Layer
    from admm.nn.surgery import decompose_model, manifest_of

    plan = plan_for_model(net, _cfg(format="tucker2"))
    fmts = {p.name: p.fmt for p in plan.layers}
    assert fmts["pw"] == "svd" and fmts["a"] == "tucker2"
    table = plan.table()
    assert "planned as svd" in table and any(line.startswith("pw") and " svd " in line for line in table.splitlines())
    with pytest.raises(ValueError, match="give one int"):
        plan_for_model(net, _cfg(format="tucker2", ranks={"pw": [4, 4]}))
    import copy

    model = decompose_model(copy.deepcopy(net), plan)
    assert isinstance(model.pw, SVDLayer) and isinstance(model.a, Tucker2Layer)
    assert manifest_of(model)["pw"]["format"] == "svd"


def test_plan_file_round_trip_and_config_key(net, tmp_path):
    cfg = _cfg(format="tucker2", allocation="error")
    plan = plan_for_model(net, cfg)
    save_plan(tmp_path / PLAN_FILE, plan, cfg)
    again = load_plan(tmp_path / PLAN_FILE, cfg)
    assert isinstance(again, RankPlan) and [(p.name, p.fmt, p.rank) for p in again.layers] == \
        [(p.name, p.fmt, p.rank) for p in plan.layers]
    assert "rel. error" in (tmp_path / "rank_plan.txt").read_text()
    assert load_plan(tmp_path / PLAN_FILE, _cfg(format="tucker2", allocation="error", keep_ratio=0.3)) is None
    # A phase that finds the file plans nothing anew, even from other weights.
    other = Net()
    fixed = plan_for_model(other, cfg, fixed=again)
    assert [p.rank for p in fixed.layers] == [p.rank for p in plan.layers]


@pytest.mark.parametrize("overrides, key", [
    (["compression.allocation=greedy"], "compression.allocation"),
    (["compression.allocation=error", "compression.min_rank_ratio=1.5"], "compression.min_rank_ratio"),
    (["compression.allocation=error", "compression.max_keep=0"], "compression.max_keep"),
    (["compression.min_rank_ratio=0.2"], "compression.min_rank_ratio"),  # uniform ignores it: say so
])
def test_bad_allocation_config_is_named(overrides, key):
    from launcher.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/quickstart.yaml", overrides)


def test_plan_command_shows_both_allocations(tmp_path, capsys):
    from launcher.cli import main
    from trainer.models import build_model

    model = build_model("resnet20", 10)
    with torch.no_grad():  # layer-varying spectra, like a trained model's
        for i, (name, m) in enumerate(model.named_modules()):
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and name != "conv1":
                m.weight.copy_(_decaying(tuple(m.weight.shape), 0.5 + 0.45 * (i % 5) / 4, seed=i))
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    assert main(["plan", "configs/quickstart.yaml", "--weights", str(path)]) == 0
    out = capsys.readouterr().out
    assert "uniform ranks" in out and "error ranks" in out
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if "sum of per-layer" in line}
    sums = {k: float(v.split("||W-Z||^2/||W||^2 ")[1].split(",")[0]) for k, v in lines.items()}
    assert sums["error"] < sums["uniform"], sums
    torch.save({"model": {"weights": model.state_dict(), "surgery": {"layer1.0.conv1": {}}}}, tmp_path / "f.pt")
    assert main(["plan", "configs/quickstart.yaml", "--weights", str(tmp_path / "f.pt")]) == 2
    assert "decomposed model" in capsys.readouterr().err


@pytest.mark.slow  # a pipeline run: ~1 min on an idle 2-core box
def test_admm_fixes_the_error_plan_and_decompose_uses_it(tiny):
    """The driver records the uniform estimate; the admm phase plans from its starting weights, writes
    phase1/rank_plan.json, and the decompose phase factors exactly those ranks (not a plan from moved weights)."""
    import json

    from launcher.run import pipeline
    from trainer.checkpoints import files as ckpt

    info = pipeline.run(tiny("model.name=resnet20", "data.train_subset=256", "data.eval_subset=128",
                             "compression.format=tucker2", "compression.keep_ratio=0.4",
                             "compression.allocation=error", "admm.unit=step", "admm.interval=2",
                             "phases=[{kind: pretrain, epochs: 1, steps_per_epoch: 2}, "
                             "{kind: admm, epochs: 1, steps_per_epoch: 2}, {kind: decompose}]"))
    assert "UNIFORM ranks, an estimate" in (info.dir / "rank_plan.txt").read_text()
    stored = json.loads((info.dir / "phase1" / PLAN_FILE).read_text())["plan"]
    assert stored["allocation"] == "error" and "rel. error" in (info.dir / "phase1" / "rank_plan.txt").read_text()
    surgery = ckpt.load_shared(ckpt.latest_checkpoint(info.dir / "checkpoints"))["model"]["surgery"]
    ranks = {row["name"]: row["rank"] for row in stored["layers"]}
    assert {n: list(s["rank"]) if isinstance(s["rank"], (list, tuple)) else s["rank"] for n, s in surgery.items()} \
        == ranks
    assert stored["params_after"] <= 0.4 * stored["dense_params"]


# -- compression.budget=flops -----------------------------------------------------------------------------------
class StridedNet(Net):
    """Net with a stride-2 conv in the middle: the later layers cost 4x fewer FLOPs per parameter, so a FLOPs
    budget weighs layers differently from a parameter budget."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(32, 32, 3, stride=2, padding=1)


@pytest.fixture(scope="module")
def strided(net) -> StridedNet:
    model = StridedNet()
    model.load_state_dict(net.state_dict())
    return model


SHAPE = (1, 3, 16, 16)


def test_budget_registry_is_the_literal():
    from admm.config import BUDGETS
    from admm.planning.planner import BUDGET_COSTS

    # latency is no count of the plan's shapes: admm.planning.latency_budget plans it from measured times
    assert (*BUDGET_COSTS, "latency") == BUDGETS == ("params", "flops", "latency")


@pytest.mark.parametrize("fmt,multiple", [("svd", 1), ("tucker2", 1), ("tucker2", 4), ("cp", 1)])
def test_flops_budget_met_within_one_rank_step(strided, fmt, multiple):
    cfg = _cfg(format=fmt, allocation="error", budget="flops", rank_multiple=multiple)
    plan = plan_for_model(strided, cfg, input_shape=SHAPE)
    assert plan.budget == "flops"
    left = 0.4 * plan.dense_flops_total - plan.flops_after_total
    assert left >= 0 and plan.kept == pytest.approx(plan.flops_after_total / plan.dense_flops_total)
    layers = {layer.name: layer for layer in describe_layers(strided, SHAPE)}
    from admm.planning.planner import layer_format

    mods = dict(strided.named_modules())
    steps = []
    for p in plan.layers:
        lad = error_ladder(layers[p.name], layer_format(p.shape, fmt), mods[p.name].weight, rank_multiple=multiple,
                           budget="flops")
        i = lad.ranks.index(p.rank)
        assert lad.costs[i] == p.flops_after  # the ladder's costs are the plan's FLOPs
        if i + 1 < len(lad.ranks):
            steps.append(lad.costs[i + 1] - lad.costs[i])
    assert steps and all(left < s for s in steps), (left, steps)
    uniform = plan_for_model(strided, _cfg(format=fmt, budget="flops", rank_multiple=multiple), input_shape=SHAPE)
    assert 0.3 < uniform.kept <= 0.4 and uniform.budget == "flops"
    # uniform bisects one shared keep fraction: a step up (5% more per layer) would break the FLOPs budget
    looser = plan_for_model(strided, _cfg(format=fmt, budget="flops", keep_ratio=0.44, rank_multiple=multiple),
                            input_shape=SHAPE)
    assert looser.flops_after_total > uniform.flops_after_total


@pytest.mark.parametrize("fmt", ["svd", "tucker2"])
def test_flops_error_allocation_beats_uniform_and_is_deterministic(strided, fmt):
    cfg = _cfg(format=fmt, allocation="error", budget="flops")
    error = plan_for_model(strided, cfg, input_shape=SHAPE)
    again = plan_for_model(strided, cfg, input_shape=SHAPE)
    assert [(p.name, p.rank) for p in error.layers] == [(p.name, p.rank) for p in again.layers]
    uniform = plan_for_model(strided, _cfg(format=fmt, budget="flops"), input_shape=SHAPE)
    weights = {p.name: dict(strided.named_modules())[p.name].weight for p in uniform.layers}
    u_err = sum(relative_errors(weights[p.name], p.fmt, [p.rank])[0] for p in uniform.layers)
    assert error.error_sum < 0.8 * u_err, (error.error_sum, u_err)
    assert error.flops_after_total <= 0.4 * error.dense_flops_total
    # The same weights under a parameter budget give another plan: the strided layer's FLOPs are cheap.
    by_params = plan_for_model(strided, _cfg(format=fmt, allocation="error"), input_shape=SHAPE)
    assert [p.rank for p in by_params.layers] != [p.rank for p in error.layers]
    assert "budget flops" in error.table()
    assert RankPlan.from_json(error.to_json()).budget == "flops"


def test_flops_budget_errors_are_named(strided):
    with pytest.raises(ValueError, match="input shape"):
        plan_for_model(strided, _cfg(budget="flops"))
    with pytest.raises(ValueError, match=r"is impossible \(compression.budget=flops\).*FLOPs"):
        plan_for_model(strided, _cfg(format="svd", budget="flops", keep_ratio=0.001), input_shape=SHAPE)
    from launcher.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"compression\.budget.*'params', 'flops'"):
        load_config("configs/quickstart.yaml", ["compression.budget=macs"])


def test_plan_command_shows_the_flops_reached(tmp_path, capsys):
    from launcher.cli import main
    from trainer.models import build_model

    path = tmp_path / "w.pt"
    torch.save(build_model("resnet20", 10).state_dict(), path)
    assert main(["plan", "configs/quickstart.yaml", "compression.budget=flops", "--weights", str(path)]) == 0
    out = capsys.readouterr().out
    kept = [float(line.split("budget flops: kept ")[1].split(";")[0]) for line in out.splitlines()
            if "budget flops: kept" in line]
    assert len(kept) == 2 and all(0.4 < k <= 0.5 for k in kept), out


def test_admm_component_plans_the_flops_budget_and_stores_it(strided, tmp_path):
    from admm.config import AdmmConfig

    cfg = _cfg(format="svd", allocation="error", budget="flops")
    comp = AdmmComponent.create(strided, cfg, AdmmConfig(), rank=0, world=1, grad_accum=1, log=lambda m, s: None,
                                input_shape=SHAPE)
    assert comp.plan.budget == "flops" and comp.plan.flops_after_total <= 0.4 * comp.plan.dense_flops_total
    save_plan(tmp_path / PLAN_FILE, comp.plan, cfg)
    stored = load_plan(tmp_path / PLAN_FILE, cfg)
    assert stored is not None and stored.budget == "flops" and stored.flops_after_total == comp.plan.flops_after_total
    # a resume reads the stored plan back (and recounts its FLOPs at the same input shape)
    again = AdmmComponent.create(strided, cfg, AdmmConfig(), rank=0, world=1, grad_accum=1, log=lambda m, s: None,
                                 input_shape=SHAPE, fixed=stored)
    assert [p.rank for p in again.plan.layers] == [p.rank for p in comp.plan.layers]
    assert again.plan.flops_after_total == comp.plan.flops_after_total