"""model.init: start a run from another run's checkpoint, an MLflow run id, or a weights file (local backend)."""
from __future__ import annotations

import pytest
import torch

from launcher.config import ConfigError
from launcher.run import pipeline
from trainer.checkpoints import files as ckpt
from trainer.init_weights import InitError, check_compatible, load_state, resolve_path
from trainer.models import build_model
from trainer.tracking import tracker as tracking


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    return ckpt.load_shared(ckpt.latest_checkpoint(run_dir / "checkpoints"))["model"]["weights"]


def _outputs(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    model = build_model("tinycnn", 10)
    model.load_state_dict(weights)
    return model.eval()(torch.linspace(-2, 2, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(_outputs(a), _outputs(b), rtol=0, atol=0)


@pytest.fixture
def source(tiny):
    """A trained tinycnn run (2 short pretrain epochs + evaluate): the dense model others start from."""
    return pipeline.run(tiny("run_name=src"))


def test_init_from_run_dir_and_mlflow_id_gives_the_source_model_and_is_recorded(tiny, source):
    src_weights = _final_weights(source.dir)
    shared = ckpt.latest_checkpoint(source.dir / "checkpoints") / "shared.pt"
    # First phase decompose: the init model is evaluated once (init_top1), then decomposed at full-ish rank.
    by_dir = pipeline.run(tiny("run_name=by-dir", f"model.init={source.dir}",
                               "phases=[{kind: decompose}, {kind: evaluate}]", "compression.keep_ratio=1.0"))
    client = tracking.client(by_dir.tracking_uri)
    parent = client.get_run(by_dir.parent_id)
    tags = parent.data.tags
    assert tags["tdcompress.init.sha256"] == ckpt.file_digest(shared)
    assert tags["tdcompress.init.run_dir"] == str(source.dir.resolve())
    assert tags["tdcompress.init.mlflow_run_id"] == source.parent_id
    assert tags["tdcompress.init.kind"] == "checkpoint" and tags["tdcompress.init.phase"] == "evaluate"
    assert parent.data.params["model.init"] == str(source.dir)
    src_top1 = client.get_run(source.parent_id).data.metrics["top1"]
    assert parent.data.metrics["init_top1"] == pytest.approx(src_top1)  # the source model, evaluated again
    assert client.get_run(by_dir.phase_ids[0]).data.metrics["before_decompose_top1"] == pytest.approx(src_top1)

    # An MLflow run id (the source's parent run) resolves through its run_dir tag to the same checkpoint.
    by_id = pipeline.run(tiny("run_name=by-id", f"model.init={source.parent_id}", "phases=[{kind: evaluate}]"))
    _assert_same(_final_weights(by_id.dir), src_weights)
    assert client.get_run(by_id.parent_id).data.tags["tdcompress.init.mlflow_run_id"] == source.parent_id
    assert "init_top1" not in client.get_run(by_id.parent_id).data.metrics  # first phase not admm/decompose

    # by-dir's newest checkpoint holds the decomposed model: not a dense model to start from.
    with pytest.raises(ConfigError, match="holds a decomposed model"):
        pipeline.run(tiny("run_name=from-factored", f"model.init={by_dir.dir}"))


def test_init_from_weights_file(tiny, tmp_path):
    torch.manual_seed(123)
    weights = build_model("tinycnn", 10).state_dict()
    file = tmp_path / "tiny.pth"  # torchvision-style file saved from a DataParallel wrapper, nested under "state_dict"
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, file)
    run = pipeline.run(tiny(f"model.init={file}", "phases=[{kind: evaluate}]"))
    _assert_same(_final_weights(run.dir), dict(weights))
    tags = tracking.client(run.tracking_uri).get_run(run.parent_id).data.tags
    assert tags["tdcompress.init.kind"] == "file"
    assert tags["tdcompress.init.sha256"] == ckpt.file_digest(file)


def test_safetensors_weights_file_loads(tmp_path):
    from safetensors.torch import save_file

    weights = build_model("tinycnn", 10).state_dict()
    file = tmp_path / "tiny.safetensors"
    save_file(dict(weights), str(file))
    _assert_same(load_state(resolve_path(str(file), file)), dict(weights))


def test_shape_mismatch_and_bad_sources_are_refused_before_training(tiny, tmp_path):
    weights = build_model("tinycnn", 5).state_dict()  # a classifier for 5 classes, the data has 10
    file = tmp_path / "five.pth"
    torch.save(weights, file)
    with pytest.raises(ConfigError, match=r"model\.init: .*first mismatched tensor fc\.weight: \(5, 16\)"):
        pipeline.run(tiny(f"model.init={file}"))
    weights = build_model("tinycnn", 10).state_dict()
    weights["extra.weight"] = weights.pop("conv2.bias")
    torch.save(weights, file)
    with pytest.raises(ConfigError, match=r"1 missing key\(s\): conv2\.bias; 1 unexpected key\(s\): extra\.weight"):
        pipeline.run(tiny(f"model.init={file}"))
    torch.save({"net": torch.nn.Linear(2, 2)}, file)  # a pickled module, not a state_dict: never unpickled
    with pytest.raises(ConfigError, match="cannot load .* as weights"):
        pipeline.run(tiny(f"model.init={file}"))
    with pytest.raises(ConfigError, match="does not exist"):
        pipeline.run(tiny(f"model.init={tmp_path / 'nowhere'}"))
    with pytest.raises(ConfigError, match="cannot be read from"):  # a run id the tracking store does not know
        pipeline.run(tiny("model.init=0123456789abcdef0123456789abcdef"))
    assert not (tmp_path / "runs").exists()  # refused on the driver: no run directory, no worker


def test_resume_does_not_reapply_init(tiny, tmp_path):
    from trainer.core.faults import InjectedFailure

    file = tmp_path / "init.pt"
    torch.save(build_model("tinycnn", 10).state_dict(), file)
    common = (f"model.init={file}", "phases.0.epochs=2", "run_name=cut")
    with pytest.raises(InjectedFailure):
        pipeline.run(tiny(*common, "debug.fail_at={phase: 0, epoch: 1}"))
    after_epoch1 = _final_weights(tmp_path / "runs" / "tiny" / "cut")
    # NaN weights at the init path now: a resume that applied the init again would train NaNs (and stop).
    torch.save({k: torch.full_like(v, float("nan")) for k, v in build_model("tinycnn", 10).state_dict().items()},
               file)
    resumed = pipeline.run(tiny(*common, "resume=true"))
    final = _final_weights(resumed.dir)
    assert all(torch.isfinite(v).all() for v in final.values())
    assert any(not torch.equal(final[k], after_epoch1[k]) for k in final)  # epoch 2 trained on from epoch 1


def test_check_compatible_and_resolve_path_units(tmp_path):
    model = build_model("tinycnn", 10)
    check_compatible(model, model.state_dict())  # identical: fine
    bad = {**model.state_dict(), "conv1.weight": torch.zeros(8, 3, 5, 5)}
    with pytest.raises(InitError, match=r"conv1\.weight: \(8, 3, 5, 5\) in .*\(8, 3, 3, 3\) in the model"):
        check_compatible(model, bad)
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(InitError, match="no intact checkpoint"):
        resolve_path("x", tmp_path / "empty-run")
    file = tmp_path / "w.pt"
    torch.save(model.state_dict(), file)
    source = resolve_path(str(file), file)
    file.write_bytes(file.read_bytes() + b"\0")  # changed after it was resolved: refused on load
    with pytest.raises(InitError, match="changed since it was resolved"):
        load_state(source)


def test_rank_prune_from_init_records_the_initial_accuracy(tiny, source):
    """A first phase rank_prune compresses the init model: its accuracy is the baseline, logged as init_top1."""
    run = pipeline.run(tiny("run_name=prune-init", f"model.init={source.dir}", "compression.exclude=[fc]",
                            "compression.min_channels=3", "rank_prune.interval=1",
                            "phases=[{kind: rank_prune, epochs: 1, steps_per_epoch: 2}, {kind: evaluate}]"))
    client = tracking.client(run.tracking_uri)
    src_top1 = client.get_run(source.parent_id).data.metrics["top1"]
    parent = client.get_run(run.parent_id).data.metrics
    assert parent["init_top1"] == pytest.approx(src_top1)  # the source model, evaluated before it was factored
    assert client.get_run(run.phase_ids[0]).data.tags["tdcompress.phase"] == "rank_prune"
    # No decompose phase: the ratios come from the init model's size against the final one's.
    src = client.get_run(source.parent_id).data.metrics
    assert parent["init_params"] == src["params"] and parent["init_flops"] == src["flops"]
    assert parent["compression"] == pytest.approx(parent["init_params"] / parent["params"])
    assert parent["flops_reduction"] == pytest.approx(parent["init_flops"] / parent["flops"])
