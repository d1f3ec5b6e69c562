"""compression.budget=latency, the pure part: the config's checks and the planner on a given latency table."""
from __future__ import annotations

import pytest
import torch

from admm.config import CompressionConfig, LatencyTarget
from admm.planning.accounting import factored_params
from admm.planning.latency_budget import LatencyCosts, latency_candidates
from admm.planning.layer_info import describe_layers
from admm.planning.model_plan import plan_document, plan_for_model, plan_from_document
from admm.planning.planner import layer_format, select
from admm.planning.rank_plan import RankPlan
from trainer.models import build_model

SHAPE = (1, 3, 16, 16)


def _cfg(**kw) -> CompressionConfig:
    latency = kw.pop("latency", {})
    return CompressionConfig(budget="latency", latency=LatencyTarget(**{"batch": 8, "points": 6, **latency}), **kw)


def _synthetic_costs(model, cfg: CompressionConfig, overhead_ms: float = 2.0, shape=SHAPE) -> LatencyCosts:
    """A latency table where every layer costs its parameters / 1000 ms (+0.01 per factored layer), and the
    layers between add ``overhead_ms``: a known table, so the planner's arithmetic can be checked exactly."""
    layers = describe_layers(model, shape)
    planned = select(layers, cfg.include, cfg.exclude, cfg.min_channels)
    dense, factored = {}, {}
    for layer in planned:
        fmt = layer_format(layer.shape, cfg.format)
        dense[layer.name] = layer.shape[0] * layer.shape[1] * layer.shape[2] * layer.shape[3] / 1000
        ranks = latency_candidates(layer.shape, fmt, cfg.latency.points)
        factored[layer.name] = {r: factored_params(layer.shape, fmt, r) / 1000 + 0.01 for r in ranks}
    return LatencyCosts(dense_model_ms=sum(dense.values()) + overhead_ms, dense_ms=dense, factored_ms=factored,
                        batch=8, runtime="eager", device="synthetic")


def test_latency_target_checks_every_field_by_name():
    with pytest.raises(ValueError, match=r"^target: must be in \(0, 1\]"):
        LatencyTarget(target=1.5)
    with pytest.raises(ValueError, match=r"^batch: must be an integer in 1\.\.4096"):
        LatencyTarget(batch=0)
    with pytest.raises(ValueError, match=r"^runtime: must be one of \('eager', 'channels_last'\), got 'onnx'"):
        LatencyTarget(runtime="onnx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^points: must be an integer in 2\.\.256"):
        LatencyTarget(points=1)
    with pytest.raises(ValueError, match=r"^latency: compression.budget=latency needs compression.latency"):
        CompressionConfig(budget="latency")
    with pytest.raises(ValueError, match=r"^latency: applies to compression.budget=latency only"):
        CompressionConfig(latency=LatencyTarget())


def test_config_file_errors_name_the_dotted_key():
    from launcher.config import ConfigError, load_config

    cfg = load_config("configs/quickstart.yaml", ["compression.budget=latency",
                                                  "compression.latency={target: 0.6, batch: 8, runtime: eager}"])
    assert cfg.compression.latency == LatencyTarget(target=0.6, batch=8, runtime="eager")
    with pytest.raises(ConfigError, match=r"compression\.latency\.runtime.*'eager', 'channels_last'"):
        load_config("configs/quickstart.yaml", ["compression.budget=latency", "compression.latency.runtime=tvm"])
    with pytest.raises(ConfigError, match=r"compression\.latency\.target"):
        load_config("configs/quickstart.yaml", ["compression.budget=latency", "compression.latency.target=0"])


def test_candidates_span_the_ladder_evenly():
    ranks = latency_candidates((64, 64, 3, 3), "svd", 5)
    assert ranks == [1, 17, 33, 48, 64]
    assert latency_candidates((64, 64, 3, 3), "svd", 8, rank_multiple=16) == [1, 16, 32, 48, 64]


@pytest.mark.parametrize("allocation", ["error", "uniform"])
def test_plan_meets_the_target_within_one_rank_step(allocation):
    model = build_model("resnet20", 10)
    cfg = _cfg(format="svd", allocation=allocation, latency={"target": 0.6})
    costs = _synthetic_costs(model, cfg)
    plan = plan_for_model(model, cfg, 1, input_shape=SHAPE, latency=costs)
    target = 0.6 * costs.dense_model_ms
    predicted = costs.dense_model_ms - sum(costs.dense_ms[p.name] - costs.factored_ms[p.name][p.rank]
                                           for p in plan.layers)
    assert plan.budget == "latency" and plan.has_latency
    assert plan.latency_after_total == pytest.approx(predicted) and predicted <= target
    assert all(p.latency_after == costs.factored_ms[p.name][p.rank] for p in plan.layers)
    if allocation == "error":
        assert plan.has_errors
        # within one rank step: no layer can take a larger measured rank without passing the target
        for p in plan.layers:
            dearer = [ms for r, ms in costs.factored_ms[p.name].items() if r > p.rank]
            assert all(predicted - p.latency_after + ms > target for ms in dearer), p.name
    assert "predicted" in plan.table() and "budget latency: keeps" in plan.table()


def test_error_allocation_spends_where_the_error_is_cheapest():
    """Two layers of one shape, one of them low rank: the greedy cuts the low-rank one deeper."""
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.Conv2d(32, 32, 3, padding=1))
    with torch.no_grad():
        model[1].weight.copy_((torch.randn(32, 2) @ torch.randn(2, 288)).reshape(32, 32, 3, 3))
        model[1].weight.add_(0.01 * torch.randn_like(model[1].weight))
    cfg = _cfg(format="svd", allocation="error", include=["*"], exclude=[], latency={"target": 0.5, "points": 16})
    shape = (1, 16, 8, 8)
    assert [layer.name for layer in select(describe_layers(model, shape), ["*"], [], 8)] == ["0", "1"]
    costs = _synthetic_costs(model, cfg, overhead_ms=0.0, shape=shape)
    plan = plan_for_model(model, cfg, 1, input_shape=shape, latency=costs)
    ranks = {p.name: p.rank for p in plan.layers}
    assert ranks["1"] < ranks["0"], ranks


def test_plan_refuses_without_a_table_and_an_impossible_target():
    model = build_model("resnet20", 10)
    with pytest.raises(ValueError, match="compression.budget=latency: planning needs the measured latencies"):
        plan_for_model(model, _cfg(), 1, input_shape=SHAPE)
    cfg = _cfg(format="svd", latency={"target": 0.01})
    with pytest.raises(ValueError, match=r"compression.latency.target=0.01 is impossible"):
        plan_for_model(model, cfg, 1, input_shape=SHAPE, latency=_synthetic_costs(model, cfg))


def test_latency_plan_survives_its_document_and_owners():
    model = build_model("resnet20", 10)
    cfg = _cfg(format="tucker2", allocation="uniform")
    plan = plan_for_model(model, cfg, 2, input_shape=SHAPE, latency=_synthetic_costs(model, cfg))
    back = plan_from_document(plan_document(plan, cfg), cfg)
    assert isinstance(back, RankPlan) and back.has_latency and {p.owner for p in back.layers} == {0, 1}
    assert back.latency_after_total == pytest.approx(plan.latency_after_total)
    # the decompose phase re-reads the stored plan at its input shape: the latencies stay with it
    again = plan_for_model(model, cfg, 2, input_shape=SHAPE, fixed=back)
    assert again.has_latency and again.kept == pytest.approx(plan.kept)
