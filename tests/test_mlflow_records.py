"""MLflow records a researcher can compare: phase runs with their own times and honest states,
one step axis, names and tags, the dataset input, the dense baseline on the parent, the logged model.

Tiny local-backend runs (tinycnn, real CIFAR-10 subset) into a real SQLite store, read through the public
MLflow client.
"""
from __future__ import annotations

import json

import pytest
import torch

from launcher.run import pipeline
from trainer.core.component import ComponentBase
from trainer.core.faults import InjectedFailure
from trainer.phases import training as training_phase
from trainer.tracking import runs as tracking_runs
from trainer.tracking import tracker as tracking

TWO = "phases=[{kind: pretrain, epochs: 2, steps_per_epoch: 4}, {kind: evaluate}]"


def _children(uri: str, parent: str) -> dict[int, object]:
    return tracking_runs.phase_children(uri, parent)


def _state(tiny, name: str) -> dict:
    from pathlib import Path

    return json.loads((Path(tiny().cluster.storage) / "tiny" / name / "run.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cifar_root):
    """One finished two-phase run (pretrain 2 x 4 steps, evaluate), its data root from $TDC_DATA_ROOT, seed 3;
    shared by the tests that only read its records."""
    from conftest import tiny_config

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDC_DATA_ROOT", str(cifar_root))  # the data root from the environment must be recorded
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's own knob: a warm run lasts ~1 s
        tmp = tmp_path_factory.mktemp("finished")
        overrides = ["data.root=null", "seed=3", "tracking.log_model=true", "tracking.register_as=tiny-model", TWO]
        return pipeline.run(tiny_config(tmp, cifar_root, overrides=overrides)), tmp


def test_phase_runs_span_their_own_time_on_one_step_axis(finished):
    info, _ = finished
    client = tracking.client(info.tracking_uri)
    parent = client.get_run(info.parent_id)
    kids = _children(info.tracking_uri, info.parent_id)
    pre, ev = kids[0].info, kids[1].info
    assert (pre.status, ev.status, parent.info.status) == ("FINISHED", "FINISHED", "FINISHED")
    # Each child starts when its phase starts and ends when it ends: in order, inside the parent.
    assert parent.info.start_time <= pre.start_time < pre.end_time <= ev.start_time <= ev.end_time
    assert ev.end_time <= parent.info.end_time
    assert pre.end_time - pre.start_time < parent.info.end_time - parent.info.start_time
    assert info.phase_ids == [pre.run_id, ev.run_id]
    # One global step: the evaluate phase's point sits after pretrain's 2 x 4 steps, not back at 0.
    assert [m.step for m in client.get_metric_history(ev.run_id, "top1")] == [8]
    assert max(m.step for m in client.get_metric_history(pre.run_id, "train_loss")) == 8
    assert client.get_run(pre.run_id).data.tags["tdcompress.phase_index"] == "0"


def test_tags_dataset_input_and_dense_baseline_on_the_parent(finished, cifar_root):
    info, _ = finished
    client = tracking.client(info.tracking_uri)
    parent = client.get_run(info.parent_id)
    tags, params, m = parent.data.tags, parent.data.params, parent.data.metrics
    assert parent.info.run_name.startswith("tinycnn-dense-")
    # The dataset is named by what it is; its storage format is a field of its own.
    assert {k: tags[k] for k in ("model", "dataset", "data_format", "method", "format", "seed")} == {
        "model": "tinycnn", "dataset": "cifar10", "data_format": "packed", "method": "dense", "format": "dense",
        "seed": "3"}
    assert tags["mlflow.user"] and tags["tdcompress.command"]
    # A model-training experiment: MLflow 3's UI opens it on its runs, not on the GenAI overview.
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert params["data.root"] == str(cifar_root.resolve()) == tags["data_root"]
    # The kernels' instruction set decides the trajectory on CPU, so the device tag names it; the model is beside it.
    assert tags["device"] == f"cpu x1 ({torch.backends.cpu.get_cpu_capability()})"
    assert tags["cpu_model"]
    inputs = parent.inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "cifar10" and json.loads(ds.source)["uri"] == str(cifar_root.resolve()) and ds.digest
    assert json.loads(ds.profile)["train_images"] == 512 and json.loads(ds.profile)["format"] == "packed"
    # The dense baseline is the pretrain phase's final top-1, and the delta is measured against it.
    pre = _children(info.tracking_uri, info.parent_id)[0]
    assert m["dense_top1"] == pytest.approx(pre.data.metrics["top1"])
    assert tags["dense_baseline"] == "phase 0 (pretrain) final top-1"
    assert m["top1_delta"] == pytest.approx(m["top1"] - m["dense_top1"])


def test_compressed_run_name_and_method_tags(tiny):
    from launcher.run.run_record import describe, method_of

    cfg = tiny("phases=[{kind: pretrain, epochs: 1, steps_per_epoch: 1}, {kind: decompose}, {kind: evaluate}]",
               "compression.format=svd", "compression.keep_ratio=0.4")
    assert (method_of(cfg), describe(cfg)) == ("direct", "tinycnn-svd-k0.4")
    assert method_of(tiny("phases=[{kind: admm, epochs: 1}, {kind: decompose}]")) == "admm"
    assert method_of(tiny("phases=[{kind: decompose}, {kind: evaluate}]", "decompose.fit=features")) == \
        "direct_features"
    info = pipeline.run(cfg)
    parent = tracking.client(info.tracking_uri).get_run(info.parent_id)
    assert parent.info.run_name.startswith("tinycnn-svd-k0.4-")
    assert (parent.data.tags["method"], parent.data.tags["format"], parent.data.tags["keep_ratio"]) == \
        ("direct", "svd", "0.4")
    # After decomposition the parent keeps the dense baseline apart from the accuracy right before decomposing.
    m = parent.data.metrics
    assert {"dense_top1", "before_decompose_top1", "decomposed_top1", "top1_delta"} <= set(m)
    # One name, one meaning: on the decompose phase's run too, the model right before decomposition is
    # before_decompose_top1; dense_top1 is only ever the dense baseline.
    kids = _children(info.tracking_uri, info.parent_id)
    decompose = tracking.client(info.tracking_uri).get_run(kids[1].info.run_id).data
    assert "dense_top1" not in decompose.metrics and "before_decompose_top1" in decompose.metrics
    assert decompose.params["format"] == "svd" and decompose.params["keep_ratio"] == "0.4"
    assert decompose.params["ranks_file"] == "planned from the weights at this phase"
    assert kids[1].info.run_name == f"{parent.info.run_name}-1-decompose"


def test_a_run_stopped_in_its_first_phase_is_killed_and_later_phases_never_start(tiny, monkeypatch):
    class Stop(ComponentBase):
        name = "stop"

        def on_epoch_end(self, loop_state) -> None:
            raise KeyboardInterrupt  # what Ctrl-C (or SIGTERM turned into it) does in the middle of phase 0

    real = training_phase.components_for
    monkeypatch.setattr(training_phase, "components_for", lambda ctx, index, model: [*real(ctx, index, model), Stop()])
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(tiny("run_name=stopped", TWO))
    state = _state(tiny, "stopped")
    client = tracking.client(state["tracking_uri"])
    assert client.get_run(state["parent_id"]).info.status == "KILLED"
    kids = _children(state["tracking_uri"], state["parent_id"])
    assert list(kids) == [0] and kids[0].info.status == "KILLED"  # the evaluate phase has no run at all
    assert state["phase_ids"] == [kids[0].info.run_id, None]


def test_a_crash_leaves_the_phase_failed_with_its_error(tiny):
    with pytest.raises(InjectedFailure):
        pipeline.run(tiny("run_name=crash", TWO, "debug.fail_at={phase: 0, epoch: 1}"))
    state = _state(tiny, "crash")
    client = tracking.client(state["tracking_uri"])
    assert client.get_run(state["parent_id"]).info.status == "FAILED"
    kids = _children(state["tracking_uri"], state["parent_id"])
    assert list(kids) == [0] and kids[0].info.status == "FAILED"
    assert kids[0].data.tags[tracking_runs.ERROR_TAG].startswith("InjectedFailure: injected failure after phase 0")
    # The resume reopens the same phase run (its error is gone) and creates the next one when it starts.
    info = pipeline.run(tiny("run_name=crash", TWO, "resume=true"))
    kids = _children(info.tracking_uri, info.parent_id)
    assert [k.info.status for _, k in sorted(kids.items())] == ["FINISHED", "FINISHED"]
    assert kids[0].info.run_id == state["phase_ids"][0]
    assert tracking_runs.ERROR_TAG not in kids[0].data.tags


def test_logged_model_loads_with_torch_alone_and_gives_the_exports_outputs(finished):
    from trainer.export.torch_export import load_exported

    info, tmp_path = finished
    client = tracking.client(info.tracking_uri)
    files = {a.path for a in client.list_artifacts(info.parent_id, "model")}
    assert {"model/model.safetensors", "model/manifest.json"} <= files
    local = client.download_artifacts(info.parent_id, "model", str(tmp_path / "dl"))
    logged, _ = load_exported(local)  # safetensors + JSON manifest: no mlflow.pyfunc, no pickle
    exported, _ = load_exported(info.dir / "export")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(logged(x), exported(x), rtol=0, atol=0)
    # tracking.register_as: a registry version pointing at that artifact
    (version,) = client.search_model_versions("name = 'tiny-model'")
    assert version.run_id == info.parent_id and version.source.endswith("/model")



def test_logged_model_loads_through_mlflow_pyfunc_and_predicts_the_exports_logits(finished, monkeypatch, cifar_root):
    """The logged model is an MLflow model (ONNX flavor): mlflow.pyfunc loads it, by run and by registry
    version, and its predictions on a batch of real images are the torch export's logits."""
    import mlflow.pyfunc

    from trainer.data import load_datasets
    from trainer.export.torch_export import load_exported

    info, tmp_path = finished
    monkeypatch.setenv("MLFLOW_TRACKING_URI", info.tracking_uri)
    client = tracking.client(info.tracking_uri)
    files = {a.path for a in client.list_artifacts(info.parent_id, "model")}
    assert {"model/MLmodel", "model/model.onnx"} <= files
    sets = load_datasets("packed", str(cifar_root), augment=False, eval_subset=16)
    x = torch.stack([sets.eval[i][0] for i in range(16)])  # real CIFAR-10 test images, normalised
    exported, _ = load_exported(info.dir / "export")
    with torch.no_grad():
        ref = exported(x).numpy()
    for uri in (f"runs:/{info.parent_id}/model", "models:/tiny-model/1"):
        model = mlflow.pyfunc.load_model(uri)
        assert model.metadata.flavors.keys() >= {"python_function", "onnx"}
        got = model.predict(x.numpy())
        got = got["logits"] if isinstance(got, dict) else got
        assert got.shape == (16, 10)
        assert abs(got - ref).max() <= 1e-4 * abs(ref).max(), uri
        assert (got.argmax(1) == ref.argmax(1)).all()

def test_system_metrics_from_mlflow_on_the_parent(finished):
    info, _ = finished
    metrics = tracking.client(info.tracking_uri).get_run(info.parent_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)
    assert any(k.startswith("system/system_memory_usage") for k in metrics)


def test_a_resumed_phase_run_lasts_the_time_it_ran_not_the_time_between(tiny):
    import time

    base = ("run_name=gap", TWO)
    w0 = time.time() * 1000
    with pytest.raises(InjectedFailure):
        pipeline.run(tiny(*base, "debug.fail_at={phase: 0, epoch: 1}"))
    down_ms = 2000
    time.sleep(down_ms / 1000)  # nothing runs: the phase's run must not count this
    info = pipeline.run(tiny(*base, "resume=true"))
    w1 = time.time() * 1000
    pre = _children(info.tracking_uri, info.parent_id)[0]
    assert pre.info.status == "FINISHED" and float(pre.data.tags[tracking_runs.ACTIVE_TAG]) > 0
    duration = pre.info.end_time - pre.info.start_time
    assert 0 < duration <= (w1 - w0) - down_ms, (duration, w1 - w0)
    assert abs(duration - 1000 * float(pre.data.tags[tracking_runs.ACTIVE_TAG])) < 100
