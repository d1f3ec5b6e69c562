"""Failures inside workers: the one line is the worker's own message, bad data is exit 2,
the resume hint only when there is a checkpoint to resume, and a FAILED phase run carries its error tag."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from launcher.cli import main
from launcher.config import dump_yaml
from trainer.tracking import runs as tracking_runs
from trainer.tracking import tracker as tracking


def _run(tiny, tmp_path: Path, capsys, *overrides: str) -> tuple[int, str, str]:
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(dump_yaml(tiny()))
    code = main(["run", str(cfg_file), *overrides])
    out, err = capsys.readouterr()
    return code, out, err


def test_nan_loss_is_the_one_line_and_no_resume_hint_without_a_checkpoint(tiny, tmp_path, capsys):
    code, out, err = _run(tiny, tmp_path, capsys, "run_name=nan", "optim.lr=1e30")
    assert code == 1
    lines = [x for x in err.splitlines() if x.startswith("tdcompress:")]
    assert len(lines) == 1 and lines[0].startswith("tdcompress: run failed: FloatingPointError: pretrain: the "
                                                   "training loss is nan at step 2; lower the learning rate"), err
    assert "resume=true" not in out + err  # it failed before its first checkpoint: nothing to resume
    assert not list((tmp_path / "runs" / "tiny" / "nan" / "checkpoints").glob("ckpt-*"))
    parent, kids = _parent_and_children(tiny, "nan")
    assert parent.info.status == "FAILED" and kids[0].info.status == "FAILED"
    assert kids[0].data.tags[tracking_runs.ERROR_TAG].startswith("FloatingPointError: pretrain: the training loss")
    assert parent.data.tags[tracking_runs.ERROR_TAG] == kids[0].data.tags[tracking_runs.ERROR_TAG]


def test_a_failure_after_a_checkpoint_gives_the_resume_hint(tiny, tmp_path, capsys):
    code, out, err = _run(tiny, tmp_path, capsys, "run_name=late", "debug.fail_at={phase: 0, epoch: 1}")
    assert code == 1 and "tdcompress run CONFIG run_name=late resume=true" in out, out + err


def _packed_with_a_broken_image(src: Path, dst: Path, n: int = 256, broken: int = 7) -> None:
    """A packed dataset of ``n`` real CIFAR-10 images per split whose train item ``broken`` is cut short."""
    dst.mkdir()
    for split in ("train", "test"):
        with np.load(src / f"{split}.npz", allow_pickle=False) as z:
            offsets, jpeg = z["offsets"][: n + 1], z["jpeg"]
            data = jpeg[: offsets[-1]].copy()
            labels, classes = z["labels"][:n], z["classes"]
        if split == "train":
            a, b = int(offsets[broken]), int(offsets[broken + 1])
            data[a + 20:b] = 0  # the header survives, the image data does not: Pillow cannot decode it
        np.savez(dst / f"{split}.npz", jpeg=data, offsets=offsets, labels=labels, classes=classes)


def test_an_undecodable_image_is_bad_data_exit_2_naming_it(tiny, tmp_path, capsys, cifar_root):
    data = tmp_path / "broken"
    _packed_with_a_broken_image(cifar_root, data)
    code, out, err = _run(tiny, tmp_path, capsys, "run_name=bad", f"data.root={data}", "data.train_subset=0",
                          "data.eval_subset=0", "phases=[{kind: pretrain, epochs: 1}]")
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.startswith("tdcompress:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("tdcompress: data error: ") and "cannot be decoded" in lines[0], lines
    assert "image 7" in lines[0] and str(data / "train.npz") in lines[0], lines
    assert "resume=true" not in out


def test_a_phase_run_its_worker_could_not_close_gets_the_runs_error(tiny, tmp_path, capsys, monkeypatch):
    """A worker that ends before closing its phase run (Ray stops the group when another rank fails): the
    driver closes it FAILED with the run's error."""
    monkeypatch.setattr(tracking_runs, "end_phase_run", lambda *a, **k: None)
    code, _, _ = _run(tiny, tmp_path, capsys, "run_name=unclosed", "optim.lr=1e30")
    assert code == 1
    parent, kids = _parent_and_children(tiny, "unclosed")
    assert kids[0].info.status == "FAILED"
    assert kids[0].data.tags[tracking_runs.ERROR_TAG].startswith("FloatingPointError: pretrain: the training loss")


def test_the_worker_error_comes_out_of_ray_trains_wrapping():
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from cluster.ray_runtime import worker_cause
    from trainer.data import DatasetError

    bad = DatasetError("dataset 'packed': image 7 (item 7 of /d/train.npz) cannot be decoded")
    wrapped = WorkerGroupError("rank 1: ...", {1: UserExceptionWithTraceback(bad, "Traceback ...\nDatasetError"),
                                               0: UserExceptionWithTraceback(ValueError("later"), "")})
    assert worker_cause(wrapped) is wrapped.worker_failures[0]._base_exc  # the lowest rank's
    assert worker_cause(WorkerGroupError("x", {1: UserExceptionWithTraceback(bad, "")})) is bad
    other = RuntimeError("controller")
    assert worker_cause(other) is other


def test_a_dataloader_reraise_is_said_by_the_workers_message():
    from trainer.data import DatasetError

    e = DatasetError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                     "last):\n  File \"x.py\", line 1, in f\ntrainer.data.DatasetError: image 7 cannot be decoded")
    assert tracking_runs.error_message(e).endswith("image 7 cannot be decoded")
    assert tracking_runs.error_text(e) == "DatasetError: image 7 cannot be decoded"


def _parent_and_children(tiny, name: str):
    import json

    state = json.loads((Path(tiny().cluster.storage) / "tiny" / name / "run.json").read_text())
    client = tracking.client(state["tracking_uri"])
    return client.get_run(state["parent_id"]), tracking_runs.phase_children(state["tracking_uri"], state["parent_id"])
