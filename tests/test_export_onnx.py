"""ONNX export: every factored format as standard operators, checked, dynamic batch, the manifest as metadata;
onnxruntime gives the torch export's logits and top-1 on real CIFAR-10 images."""
from __future__ import annotations

import json
import re

import onnx
import pytest
import torch

from admm.config import CompressionConfig
from admm.nn.fold import fold_batchnorm
from admm.nn.surgery import decompose_model, manifest_of
from admm.planning.model_plan import plan_for_model
from trainer.export.onnx_export import INPUT, OPSET, TOLERANCE, export_onnx, load_onnx, manifest_from_metadata
from trainer.export.torch_export import FORMAT_VERSION, ExportError
from trainer.models import build_model

# Conv nodes each factored conv becomes when its chain is kept (svd: kxk + 1x1; tucker2, cp: three convs).
CONVS_PER_LAYER = {"svd": 2, "tucker2": 3, "cp": 3}


def _factored_resnet20(fmt: str) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = build_model("resnet20", 10).eval()
    for m in model.modules():  # BN statistics that are not the identity, so folding is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    plan = plan_for_model(model, CompressionConfig(format=fmt, keep_ratio=0.5), input_shape=(1, 3, 32, 32))
    model = decompose_model(model, plan).eval()
    folded = fold_batchnorm(model)
    manifest = {"format_version": FORMAT_VERSION, "model": "resnet20", "num_classes": 10, "image_size": 32,
                "dataset": "packed", "surgery": manifest_of(model), "folded_bn": [list(p) for p in folded]}
    return model, manifest


@pytest.mark.parametrize("fmt", ["svd", "tucker2", "cp", "tt", "lowrank_sparse"])
def test_every_format_exports_as_standard_operators(fmt, tmp_path):
    model, manifest = _factored_resnet20(fmt)
    path = tmp_path / "model.onnx"
    error = export_onnx(model, manifest, path)
    assert error <= TOLERANCE and not path.with_name("model.onnx.tmp").exists()
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain for o in proto.opset_import if o.domain in ("", "ai.onnx")} and \
        max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == OPSET >= 17
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, "custom operators in the graph"
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops or fmt == "tt"  # tt's output chain is not one conv to fold into
    if fmt in CONVS_PER_LAYER:  # the chain is kept, not collapsed to one dense conv per layer
        dense_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        assert ops.count("Conv") == dense_convs + CONVS_PER_LAYER[fmt] * len(manifest["surgery"])
    (inp,) = proto.graph.input
    batch_dim, *dims = inp.type.tensor_type.shape.dim
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # dynamic batch
    assert inp.name == INPUT and [d.dim_value for d in dims] == [3, 32, 32]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["tdcompress.surgery"]) == manifest["surgery"] and props["tdcompress.model"] == "resnet20"
    assert json.loads(props["tdcompress.mean"]) == pytest.approx([0.4914, 0.4822, 0.4465])
    assert props["tdcompress.input"].startswith(f"{INPUT}: float32 (N, 3, 32, 32)")
    ort_model, read = load_onnx(path)
    assert read == manifest
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
    got = ort_model(x)
    assert got.shape == (5, 10)
    assert (got - ref).abs().max() <= TOLERANCE * ref.abs().max()


def test_metadata_without_a_manifest_or_with_a_bad_one_is_refused():
    with pytest.raises(ExportError, match="no tdcompress.manifest metadata prop"):
        manifest_from_metadata({"tdcompress.model": "resnet20"}, "m.onnx")
    bad = {"format_version": FORMAT_VERSION, "model": "resnet20", "num_classes": 10, "image_size": 10**6}
    with pytest.raises(ExportError, match=r"m.onnx \(tdcompress.manifest\): image_size must be an integer in"):
        manifest_from_metadata({"tdcompress.manifest": json.dumps(bad)}, "m.onnx")


def test_evaluate_onnxruntime_without_an_onnx_file_says_how_to_write_one(tmp_path, capsys):
    from launcher.cli import main

    assert main(["evaluate", str(tmp_path), "--runtime", "onnxruntime", "--no-data"]) == 2
    assert "tdcompress export RUN_DIR --format onnx" in capsys.readouterr().err


def _scores(out: str) -> tuple[str, str, str]:
    match = re.search(r"top1 (\S+)%  top5 (\S+)%  on (\d+) packed images", out)
    assert match, out
    return match.groups()


@pytest.mark.slow  # trains 40 steps and evaluates 2,000 images four times: ~1 min on an idle 2-core CPU
def test_quickstart_model_in_onnxruntime_matches_torch_on_2000_real_images(tiny, tmp_path, capsys):
    """A trained, decomposed and fine-tuned ResNet-20 (the quickstart's phases, shortened) exported with
    --format onnx: onnxruntime's logits on 2,000 real CIFAR-10 test images are torch's within 1e-4 relative,
    and evaluate reports the same top-1/top-5."""
    from launcher.cli import main
    from launcher.run import pipeline
    from trainer.data import load_datasets, make_loader
    from trainer.export.torch_export import load_exported

    cfg = tiny("model.name=resnet20", "data.train_subset=2048", "compression.format=tucker2",
               "compression.keep_ratio=0.5",
               "phases=[{kind: pretrain, epochs: 1, steps_per_epoch: 32}, {kind: decompose},"
               " {kind: finetune, epochs: 1, steps_per_epoch: 8}]")
    info = pipeline.run(cfg)
    out = tmp_path / "export"
    assert main(["export", str(info.dir), "--out", str(out), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    assert "onnx: opset 18, dynamic batch, onnx.checker passed" in printed and "model.onnx)" in printed

    torch_model, manifest = load_exported(out)
    ort_model, _ = load_onnx(out)
    sets = load_datasets("packed", cfg.data.root, augment=False, eval_subset=2000)
    worst, agree, n, classes = 0.0, 0, 0, set()
    for x, _ in make_loader(sets.eval, 500, rank=0, world_size=1, shuffle=False, seed=0, drop_last=False):
        with torch.no_grad():
            ref = torch_model(x)
        got = ort_model(x)
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        classes |= set(ref.argmax(1).tolist())
        n += len(x)
    assert n == 2000 and worst <= 1e-4, worst
    assert agree == n
    assert len(classes) >= 4, classes  # varied predictions, not one class everywhere: the comparison means something

    common = [str(out), "--data-root", cfg.data.root, "--limit", "2000", "--latency-batches", "1,8"]
    assert main(["evaluate", *common]) == 0
    torch_out = capsys.readouterr().out
    assert main(["evaluate", *common, "--runtime", "onnxruntime"]) == 0
    ort_out = capsys.readouterr().out
    assert _scores(ort_out) == _scores(torch_out) and _scores(ort_out)[2] == "2000"
    assert "runtime onnxruntime" in ort_out and "latency batch 8:" in ort_out and "onnxruntime)" in ort_out
    assert main(["evaluate", str(out), "--runtime", "onnxruntime", "--compile", "--no-data"]) == 2

