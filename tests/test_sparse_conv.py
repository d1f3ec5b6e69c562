"""Low-rank + sparse with S at its real density: the gather form (admm.nn.sparse_conv) as a realization."""
from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from admm.config import CompressionConfig
from admm.feature_fit import fit_layer, layer_columns
from admm.nn.fold import apply_folding, fold_batchnorm
from admm.nn.layers import LowRankSparseLayer, factorize_module
from admm.nn.realize import alternatives, realize
from admm.nn.surgery import apply_manifest, decompose_model, manifest_of
from admm.planning.model_plan import plan_for_model
from trainer.data import load_datasets
from trainer.export.latency import layer_latency_table
from trainer.export.onnx_export import TOLERANCE, export_onnx
from trainer.export.torch_export import FORMAT_VERSION
from trainer.models import build_model

GEOMETRIES = [  # dense conv, (r, k)
    (nn.Conv2d(12, 20, 3, padding=1), (3, 30)),
    (nn.Conv2d(12, 20, 3, stride=2, padding=1, bias=False), (3, 30)),
    (nn.Conv2d(8, 6, 3, padding=2, dilation=2), (2, 20)),
    (nn.Conv2d(8, 6, 1, stride=2), (2, 10)),
    (nn.Conv2d(8, 6, 3, padding="same"), (2, 25)),
    (nn.Conv2d(8, 6, (3, 1), padding=(1, 0)), (2, 12)),
]


def _s_conv(layer: LowRankSparseLayer, x: torch.Tensor) -> torch.Tensor:
    """S alone as the dense conv the default form runs."""
    return F.conv2d(x, layer.sparse_dense(), None, **layer.geometry.conv_kwargs)


@pytest.mark.parametrize("dense,rank", GEOMETRIES, ids=[str(i) for i in range(len(GEOMETRIES))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gather_form_equals_the_dense_s_conv(dense, rank, channels_last):
    torch.manual_seed(0)
    layer = factorize_module(dense, "lowrank_sparse", rank).eval()
    sparse = alternatives(layer)["sparse"]
    assert isinstance(sparse, LowRankSparseLayer) and sparse.sparse_form == "gather" and layer.sparse_form == "dense"
    x = torch.randn(2, dense.in_channels, 9, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, got = layer(x), sparse(x)
        s_only = sparse._gather_forward(x)
        torch.testing.assert_close(s_only, _s_conv(layer, x), rtol=0, atol=1e-5)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_on_a_real_fitted_kernel_equal_within_1e5_and_fewer_flops(cifar_root):
    """A feature-fitted S (real images, ResNet-20's 64-channel layer): same output, FLOPs from its columns only."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    sets = load_datasets("packed", str(cifar_root), augment=False, seed=0, train_subset=64)
    images = torch.stack([sets.train[i][0] for i in range(64)])
    feats: dict[str, torch.Tensor] = {}
    conv = model.layer3[1].conv1
    handle = conv.register_forward_pre_hook(lambda m, i: feats.setdefault("x", i[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    cols = layer_columns(conv, feats["x"])
    layer = fit_layer(conv, "lowrank_sparse", (18, 310), cols @ cols.t()).eval()
    sparse = alternatives(layer)["sparse"]
    x = feats["x"][:8]
    with torch.no_grad():
        torch.testing.assert_close(sparse._gather_forward(x), _s_conv(layer, x), rtol=0, atol=1e-5)
        torch.testing.assert_close(sparse(x), layer(x), rtol=0, atol=1e-5)
    counted = {}
    for name, module in (("dense", layer), ("sparse", sparse)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(x[:1])
        counted[name] = counter.get_total_flops()
    n_cols = sparse._s_columns.numel()
    pixels = 8 * 8
    low = 2 * 18 * (64 * 9 + 64) * pixels
    assert counted["dense"] == low + 2 * 64 * 64 * 9 * pixels  # S as one more dense conv
    assert counted["sparse"] == low + 2 * n_cols * 64 * pixels  # S as the GEMM over its columns
    assert n_cols <= 310 and counted["sparse"] < 0.75 * counted["dense"]


def test_gradients_reach_the_values_as_in_the_dense_form():
    torch.manual_seed(0)
    layer = factorize_module(nn.Conv2d(6, 8, 3, padding=1), "lowrank_sparse", (2, 15))
    sparse = alternatives(layer)["sparse"]
    x = torch.randn(2, 6, 7, 7)
    grads = []
    for module in (layer, sparse):
        module.zero_grad()
        module(x).square().sum().backward()
        grads.append(module.sparse_values.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


def test_the_gather_form_is_refused_where_it_does_not_apply():
    linear = factorize_module(nn.Linear(16, 10), "lowrank_sparse", (2, 10))
    assert "sparse" not in alternatives(linear)
    with pytest.raises(ValueError, match="sparse_form 'gather' applies to conv layers only"):
        linear.use_sparse_form("gather")
    conv = factorize_module(nn.Conv2d(6, 8, 3, padding=1), "lowrank_sparse", (2, 15))
    with pytest.raises(ValueError, match=r"sparse_form must be one of \('dense', 'gather'\), got 'csr'"):
        conv.use_sparse_form("csr")
    even = factorize_module(nn.Conv2d(6, 8, 2, padding="same"), "lowrank_sparse", (2, 5))
    with pytest.raises(ValueError, match="pads unevenly"):
        alternatives(even)["sparse"](torch.randn(1, 6, 5, 5))


def _lrs_resnet20() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    for m in model.modules():  # BN statistics that are not the identity, so folding scales S too
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    plan = plan_for_model(model, CompressionConfig(format="lowrank_sparse", keep_ratio=0.33),
                          input_shape=(1, 3, 32, 32))
    return decompose_model(model, plan).eval()


def test_realized_sparse_form_round_trips_through_the_manifest():
    model = _lrs_resnet20()
    folded = [list(p) for p in fold_batchnorm(model)]
    names = list(manifest_of(model))
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    realize(model, {names[0]: "sparse", names[-1]: "sparse"})
    manifest = manifest_of(model)
    assert manifest[names[0]]["sparse_form"] == "gather" and "sparse_form" not in manifest[names[1]]
    assert set(model.state_dict()) == keys  # the form's layout buffers are derived, not stored
    # As trainer.export.torch_export.load_exported rebuilds an export: folding first, then the manifest.
    fresh = apply_manifest(apply_folding(build_model("resnet20", 10), folded), manifest)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert fresh.get_submodule(names[0]).sparse_form == "gather"
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(fresh(x), ref, rtol=0, atol=1e-4)


def test_latency_table_times_the_sparse_form_as_a_candidate():
    model = _lrs_resnet20()
    rows = layer_latency_table(model, (1, 3, 32, 32), repeats=1, warmup=0)
    assert rows and all(set(r.ms) == {"factored", "dense", "sparse"} for r in rows)
    assert all(r.ms["sparse"] > 0 for r in rows)


@pytest.mark.slow
def test_sparse_form_exports_to_onnx_as_gather_and_matmul(tmp_path):
    """The gather form is standard operators: S's dense conv is gone from the graph, GatherND + MatMul replace it
(S's values scattered into its column matrix by ScatterND at each run: k elements)."""
    model = _lrs_resnet20()
    folded = fold_batchnorm(model)
    names = list(manifest_of(model))
    realize(model, {n: "sparse" for n in names})
    manifest = {"format_version": FORMAT_VERSION, "model": "resnet20", "num_classes": 10, "image_size": 32,
                "dataset": "packed", "surgery": manifest_of(model), "folded_bn": [list(p) for p in folded]}
    path = tmp_path / "model.onnx"
    assert export_onnx(model, manifest, path) <= TOLERANCE  # onnxruntime checked against torch inside
    proto = onnx.load(str(path))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, "custom operators in the graph"
    ops = [n.op_type for n in proto.graph.node]
    dense_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert ops.count("Conv") == dense_convs + 2 * len(names)  # the svd pair only: no S conv left
    gathers = ops.count("Gather") + ops.count("GatherND")  # advanced indexing exports as GatherND
    assert gathers >= len(names) and ops.count("MatMul") >= len(names)


@pytest.mark.slow
def test_tuned_export_of_low_rank_plus_sparse_loads_and_counts_what_runs(tiny, tmp_path):
    """--tune-batch with the sparse candidate: every choice is recorded, the export loads with the same outputs,
    and ``flops_per_image`` is what FlopCounterMode counts on the model as exported."""
    from launcher.run import pipeline
    from trainer.export.torch_export import export_run, load_exported

    info = pipeline.run(tiny("model.name=resnet20", "compression.format=lowrank_sparse", "compression.keep_ratio=0.33",
                             "phases=[{kind: pretrain, epochs: 1, steps_per_epoch: 2}, {kind: decompose}]"))
    plain = export_run(info.dir, tmp_path / "plain")
    tuned = export_run(info.dir, tmp_path / "tuned", tune_batch=2)
    a, plain_manifest = load_exported(plain)
    b, manifest = load_exported(tuned)
    rows = manifest["latency_table"]["rows"]
    assert rows and all(set(r["ms"]) == {"factored", "dense", "sparse"} for r in rows)
    for row in rows:  # a gathered S stays lowrank_sparse, its form in the spec
        spec = manifest["surgery"].get(row["layer"])
        assert (spec is None) == (row["choice"] == "dense")
        if spec is not None:
            assert spec.get("sparse_form", "dense") == ("gather" if row["choice"] == "sparse" else "dense")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-4)
    for model, m in ((a, plain_manifest), (b, manifest)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 3, 32, 32))
        assert m["flops_per_image"] == counter.get_total_flops() > 0
    gathered = realize(a, {n: "sparse" for n in plain_manifest["surgery"]})
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        gathered(torch.zeros(1, 3, 32, 32))
    assert counter.get_total_flops() < plain_manifest["flops_per_image"]  # S at its density costs less than dense S
