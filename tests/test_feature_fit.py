"""decompose.fit=features (Yu et al. 2017): factors fitted to layer outputs on real calibration images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from admm.feature_fit import FEATURE_FIT_FORMATS, fit_layer, layer_columns, output_error
from admm.nn.layers import factorize_module
from launcher.config import ConfigError
from launcher.run import pipeline
from trainer.data import load_datasets
from trainer.models import build_model
from trainer.tracking import tracker as tracking

RANKS = {"svd": 4, "tucker2": (6, 4), "lowrank_sparse": (3, 64)}


def _real_inputs(root, n: int) -> torch.Tensor:
    sets = load_datasets("packed", str(root), augment=False, seed=0, train_subset=n)
    return torch.stack([sets.train[i][0] for i in range(n)])


def test_feature_fit_formats_match_the_config_check():
    from trainer.worker_config import WorkerConfig, check_methods

    for fmt in ("svd", "tucker2", "tt", "cp", "lowrank_sparse"):
        cfg = WorkerConfig()
        cfg.compression.format, cfg.decompose.fit = fmt, "features"
        cfg.phases[1].kind = "decompose"
        if fmt in FEATURE_FIT_FORMATS:
            check_methods(cfg)
        else:
            with pytest.raises(ValueError, match="decompose.fit: features exists for"):
                check_methods(cfg)


@pytest.mark.parametrize("fmt", sorted(RANKS))
def test_output_error_on_held_out_images_is_lower_than_weight_fit(fmt, cifar_root):
    """Same (r, k) budget: the layer-output error on images the fit never saw is lower than the weight-only fit's."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    images = _real_inputs(cifar_root, 192)
    feats = {}
    layer = model.layer1[0].conv2
    handle = layer.register_forward_pre_hook(lambda m, i: feats.setdefault("x", []).append(i[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    x = feats["x"][0]
    calib, held = x[:128], x[128:]
    cols = layer_columns(layer, calib)
    sigma = cols @ cols.t()
    fitted, weight_only = fit_layer(layer, fmt, RANKS[fmt], sigma), factorize_module(layer, fmt, RANKS[fmt])
    assert sum(p.numel() for p in fitted.parameters()) == sum(p.numel() for p in weight_only.parameters())
    with torch.no_grad():
        y = layer(held)
        err_fit = (fitted(held) - y).square().sum().item()
        err_weight = (weight_only(held) - y).square().sum().item()
        # On the calibration inputs the fit is never worse (each step lowers the output error) ...
        w = layer.weight
        assert output_error(w, fitted.to_dense_weight(), sigma) <= output_error(w, weight_only.to_dense_weight(), sigma)
    # ... and on held-out images it is clearly better (measured ratios 0.3-0.7 for these ranks).
    assert err_fit < 0.9 * err_weight, (fmt, err_fit, err_weight)


def test_full_rank_feature_fit_is_exact(cifar_root):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=True)
    x = _real_inputs(cifar_root, 16)
    cols = layer_columns(conv, x)
    for fmt, rank in (("svd", 8), ("tucker2", (8, 3))):
        layer = fit_layer(conv, fmt, rank, cols @ cols.t())
        with torch.no_grad():
            torch.testing.assert_close(layer(x), conv(x), atol=1e-3, rtol=1e-3)  # fp32 factors, damped Sigma


def test_feature_fit_needs_real_data_and_a_sample_the_split_holds(tiny, tmp_path):
    phases = "phases=[{kind: pretrain, epochs: 1, steps_per_epoch: 2}, {kind: decompose}]"
    with pytest.raises(ConfigError, match="decompose.fit: features fits layer outputs on real training images"):
        pipeline.run(tiny("data.dataset=synthetic", "decompose.fit=features", "compression.format=svd", phases))
    with pytest.raises(ConfigError, match=r"decompose.calibration_batches: 9 batches .* more than the 512 training"):
        pipeline.run(tiny("decompose.fit=features", "decompose.calibration_batches=9", "compression.format=svd",
                          phases))
    with pytest.raises(ConfigError, match="decompose.fit: features exists for compression.format"):
        pipeline.run(tiny("decompose.fit=features", "compression.format=tt", phases))
    with pytest.raises(ConfigError, match="decompose.calibration_batches: must be >= 1"):
        pipeline.run(tiny("decompose.calibration_batches=0", phases))
    assert not (tmp_path / "runs").exists()


R20 = ("model.name=resnet20", "data.train_subset=1024", "data.eval_subset=512", "optim.lr=0.05",
       "compression.keep_ratio=0.35", "decompose.calibration_batches=2")


def _decompose_metrics(info) -> dict[str, float]:
    client = tracking.client(info.tracking_uri)
    return client.get_run(info.phase_ids[0]).data.metrics


@pytest.mark.slow
def test_trained_resnet20_decomposes_better_and_sparse_part_stays_sparse(tiny, tmp_path):
    """Top-1 right after decomposition is higher with the feature fit; the exported S stores only k values."""
    from safetensors import safe_open

    from trainer.export.torch_export import export_run, load_exported

    pre = pipeline.run(tiny(*R20, "run_name=pre", "phases=[{kind: pretrain, epochs: 2, steps_per_epoch: 16}]"))
    runs = {}
    for fmt in ("svd", "lowrank_sparse"):
        for fit in ("weights", "features"):
            runs[fmt, fit] = pipeline.run(tiny(*R20, f"run_name={fmt}-{fit}", f"model.init={pre.dir}",
                                               f"compression.format={fmt}", f"decompose.fit={fit}",
                                               "phases=[{kind: decompose}]"))
    top1 = {key: _decompose_metrics(info)["decomposed_top1"] for key, info in runs.items()}
    dense = _decompose_metrics(runs["svd", "weights"])["before_decompose_top1"]
    print(f"feature fit: dense {dense:.2f}%, right after decomposition {top1}")
    assert dense > 18, dense  # the short pretrain learned something (chance: 10%)
    for fmt in ("svd", "lowrank_sparse"):
        assert top1[fmt, "features"] > top1[fmt, "weights"] + 2, top1

    out = export_run(runs["lowrank_sparse", "features"].dir, tmp_path / "export")
    manifest = json.loads((out / "manifest.json").read_text())
    plan = {row["name"]: row for row in json.loads((runs["lowrank_sparse", "features"].dir / "rank_plan.json")
                                                   .read_text())["layers"]}
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for name, spec in manifest["surgery"].items():
            k = spec["rank"][1]
            values = f.get_tensor(f"{name}.sparse_values")
            assert values.shape == (k,) and f.get_tensor(f"{name}.sparse_index").shape == (k,)
            # The stored S is its k values and indices, not a dense kernel (k is a few % of the kernel here).
            assert k < 0.1 * np.prod(plan[name]["shape"])
    model, _ = load_exported(out)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
