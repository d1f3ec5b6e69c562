"""compression.budget=latency on this CPU: the measured table, its cache, the plan from it and `tdcompress plan`.

No assertion here is on a time: the plan's target is checked on the *predicted* latency of the measured
table (the planner's arithmetic), the cache by what it measured, and the end-to-end figure by being printed.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from admm.config import CompressionConfig, LatencyTarget
from admm.planning.model_plan import plan_for_model
from trainer.export.latency_table import LatencyCache, measure_costs
from trainer.models import build_model

SHAPE = (1, 3, 32, 32)
# ResNet-20's 64-channel stage (6 convs of two kinds, 8x8 maps) at batch 32: its rank-1 svd layers do ~30x
# fewer FLOPs than the dense ones, so even a loaded CPU times them faster (on smaller layers call overhead wins).
CFG = CompressionConfig(format="svd", include=["layer3.*"], allocation="error", budget="latency",
                        latency=LatencyTarget(target=0.9, batch=32, points=4))
FAST = {"repeats": 5, "warmup": 1, "model_repeats": 3}


@pytest.fixture(autouse=True)
def one_thread():
    """Time on one thread: on a CPU shared with other jobs a multi-threaded pass waits at every barrier for a
    descheduled thread, which can inflate even the fastest of a few passes many times over; one thread is only
    ever paused. The thread count is part of the cache key, so these timings never mix with others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fastest_fraction(costs) -> float:
    """The predicted fraction of the dense latency with every planned layer at its fastest measured rank."""
    saved = sum(costs.dense_ms[n] - min(ms.values()) for n, ms in costs.factored_ms.items())
    return (costs.dense_model_ms - saved) / costs.dense_model_ms


@pytest.mark.slow  # times ~20 forward passes per layer and model: seconds idle, minutes on a loaded CPU
def test_latency_plan_meets_its_target_from_the_measured_table_and_reuses_it(tmp_path):
    model = build_model("resnet20", 10)
    path = tmp_path / "latency.json"
    cache = LatencyCache.open(path)
    costs = measure_costs(model, CFG, SHAPE, cache, **FAST)
    planned = {f"layer3.{b}.conv{c}" for b in range(3) for c in (1, 2)}
    assert set(costs.factored_ms) == planned and all(len(ms) == 4 for ms in costs.factored_ms.values())
    # 1 model + 2 layers (32->64 stride 2 on 16x16, 64->64 on 8x8) x (dense + 4 ranks): the five 64->64 convs
    # share their timings (same key)
    assert cache.measured == 11 and path.is_file()
    keys = [json.loads(k) for k in json.loads(path.read_text())["ms"]]
    assert {k["batch"] for k in keys} == {32} and all("cpu:" in k["device"] and k["torch"] for k in keys)

    # A target this table can reach on this CPU: halfway between its fastest plan and the dense model.
    fastest = _fastest_fraction(costs)
    assert fastest < 1, f"rank-1 layers timed no faster than dense ones: {costs}"
    target = round(min(1.0, (fastest + 1) / 2), 4)
    cfg = dataclasses.replace(CFG, latency=dataclasses.replace(CFG.latency, target=target))
    again = LatencyCache.open(path)
    costs2 = measure_costs(model, cfg, SHAPE, again, **FAST)
    assert again.measured == 0 and again.reused > 0  # the second plan measured nothing
    assert costs2.dense_model_ms == costs.dense_model_ms and costs2.factored_ms == costs.factored_ms

    plan = plan_for_model(model, cfg, 1, input_shape=SHAPE, latency=costs2)
    budget = target * costs2.dense_model_ms
    assert plan.latency_after_total <= budget + 1e-9
    # Within one rank step: no layer could take a larger measured rank (lower svd error) that times slower and
    # still fit. (A larger rank that timed *faster* dominates: the planner's hull never stops below one.)
    for p in plan.layers:
        dearer = [ms for r, ms in costs2.factored_ms[p.name].items() if r > p.rank and ms > p.latency_after]
        assert all(plan.latency_after_total - p.latency_after + ms > budget for ms in dearer), p.name


@pytest.mark.slow
def test_plan_command_prints_predicted_and_measured_latency(tmp_path, capsys):
    from launcher.cli import main

    cache = tmp_path / "latency.json"
    args = ["plan", "configs/quickstart.yaml", "model.name=resnet20", "compression.format=svd",
            "compression.include=[layer3.*]", "compression.budget=latency",
            "compression.latency={target: 1.0, batch: 32, points: 3}", "--latency-cache", str(cache)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "timings measured" in out and "UNIFORM allocation" not in out
    line = next(x for x in out.splitlines() if x.startswith("latency per batch of 32, measured end to end now"))
    dense_ms = float(line.split("dense ")[1].split(" ms")[0])
    planned_ms = float(line.split("planned ")[1].split(" ms")[0])
    assert dense_ms > 0 and planned_ms > 0 and "predicted" in line
    assert "compression.ranks=" in out and "layer3.2.conv2" in out
    measured_first = json.loads(cache.read_text())["ms"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert " 0 timings measured" in out and json.loads(cache.read_text())["ms"] == measured_first


def test_run_refuses_a_latency_budget_with_what_to_do(tmp_path):
    from launcher.config import ConfigError, load_config
    from launcher.run.pipeline import make_plan

    cfg = load_config("configs/quickstart.yaml", ["compression.budget=latency", "compression.latency={target: 0.5}"])
    with pytest.raises(ConfigError, match=r"planned by `tdcompress plan CONFIG"):
        make_plan(cfg, 10, 32)
