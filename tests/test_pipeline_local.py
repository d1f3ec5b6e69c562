"""End to end through the local backend (DeepSpeed, one rank, no Ray): MLflow runs, checkpoints, resume."""
from __future__ import annotations

import pytest
import torch

from launcher.config import ConfigError
from launcher.run import pipeline
from trainer.checkpoints import files as ckpt
from trainer.tracking import tracker as tracking


def _final_weights(info) -> dict[str, torch.Tensor]:
    last = ckpt.latest_checkpoint(info.dir / "checkpoints")
    return ckpt.load_shared(last)["model"]["weights"]


def test_run_creates_mlflow_runs_metrics_and_checkpoint(tiny):
    cfg = tiny()
    info = pipeline.run(cfg)
    client = tracking.client(info.tracking_uri)
    parent = client.get_run(info.parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model.name"] == "tinycnn"
    assert parent.data.params["phases.0.kind"] == "pretrain"
    assert parent.data.metrics["top1"] > 0  # evaluate phase reports to the parent too
    children = [client.get_run(r) for r in info.phase_ids]
    assert [c.data.tags["tdcompress.phase"] for c in children] == ["pretrain", "evaluate"]
    assert all(c.data.tags["mlflow.parentRunId"] == info.parent_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    pre = children[0]
    for key in ("train_loss", "lr", "images_per_s", "top1", "top5", "best_top1"):
        assert key in pre.data.metrics, key
    history = client.get_metric_history(pre.info.run_id, "train_loss")
    assert len(history) >= 4 and sorted({m.step for m in history}) == sorted(m.step for m in history)
    artifacts = [a.path for a in client.list_artifacts(info.parent_id)]
    assert "config.yaml" in artifacts
    last = ckpt.latest_checkpoint(info.dir / "checkpoints")
    meta = ckpt.read_meta(last)
    assert meta["phase"] == "evaluate" and meta["phase_done"]
    assert not list((info.dir / "checkpoints").glob("*.tmp"))


def test_resume_after_failure_matches_uninterrupted_run(tiny):
    from trainer.core.faults import InjectedFailure

    full = pipeline.run(tiny("run_name=full", "phases.0.epochs=3"))
    with pytest.raises(InjectedFailure, match="after phase 0 epoch 1"):
        pipeline.run(tiny("run_name=cut", "phases.0.epochs=3", "debug.fail_at={phase: 0, epoch: 1}"))
    cut_dir = full.dir.parent / "cut"
    meta = ckpt.read_meta(ckpt.latest_checkpoint(cut_dir / "checkpoints"))
    assert (meta["phase"], meta["epoch"], meta["phase_done"]) == ("pretrain", 1, False)
    client = tracking.client(full.tracking_uri)
    import json

    state = json.loads((cut_dir / "run.json").read_text())
    assert client.get_run(state["parent_id"]).info.status == "FAILED"
    resumed = pipeline.run(tiny("run_name=cut", "phases.0.epochs=3", "resume=true"))
    assert resumed.parent_id == state["parent_id"]  # the same MLflow runs continue
    assert client.get_run(state["parent_id"]).info.status == "FINISHED"
    a, b = _final_weights(full), _final_weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_resume_errors_are_clear(tiny):
    with pytest.raises(ConfigError, match="resume: no earlier run"):
        pipeline.run(tiny("resume=true"))
    pipeline.run(tiny("run_name=once", "phases=[{kind: evaluate}]"))
    with pytest.raises(ConfigError, match="already holds a run"):
        pipeline.run(tiny("run_name=once", "phases=[{kind: evaluate}]"))


def test_missing_dataset_fails_before_any_worker(tiny, tmp_path):
    from trainer.data import DatasetError

    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        pipeline.run(tiny(f"data.root={tmp_path / 'nowhere'}"))
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_compare_lists_runs_side_by_side(tiny, tmp_path, capsys):
    from launcher.cli import main

    info = pipeline.run(tiny("run_name=cmp"))
    capsys.readouterr()
    assert main(["compare", "--tracking-uri", info.tracking_uri, "--plot", str(tmp_path / "cmp.png")]) == 0
    out = capsys.readouterr().out
    assert "cmp" in out and "top1 %" in out and "FINISHED" in out
    assert main(["compare", "--tracking-uri", info.tracking_uri, "--experiment", "nope"]) == 2
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err
