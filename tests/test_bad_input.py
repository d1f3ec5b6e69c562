"""Hostile but realistic input is refused with a message that names what is wrong."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_image_folder

from launcher.cli import main
from launcher.config import ConfigError, load_config
from launcher.run import pipeline
from trainer.data import DatasetError, load_datasets

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.mark.parametrize("override, fragments", [
    ("run_name=../../../x", ["run_name", "plain name"]),
    ("run_name=a/b", ["run_name", "plain name"]),
    ("run_name=.hidden", ["run_name", "plain name"]),
    ("name=..", ["name", "plain name"]),
    ("optim.lr=.inf", ["optim.lr", "finite"]),
    ("admm.rho=.nan", ["admm.rho", "finite"]),
    ("phases=[{kind: pretrain}, {kind: decompose}, {kind: admm}]", ["phases.2.kind", "before the decompose"]),
])
def test_config_refuses(override, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(QUICKSTART, [override])
    for frag in fragments:
        assert frag in str(e.value), (frag, str(e.value))


def test_more_workers_than_cores_is_refused_before_ray(tiny, tmp_path):
    import os

    cores = len(os.sched_getaffinity(0))
    cfg = tiny("cluster.backend=ray", f"cluster.num_workers={cores + 1}", f"data.batch_size={64 * (cores + 1)}",
               "run_name=crowd")
    with pytest.raises(ConfigError, match="cluster.num_workers"):
        pipeline.run(cfg)
    assert not (tmp_path / "runs" / "tiny" / "crowd").exists()  # refused before anything was created


def test_batch_larger_than_the_data_is_refused_before_workers(tiny, tmp_path):
    with pytest.raises(ConfigError, match="data.batch_size"):
        pipeline.run(tiny("data.train_subset=100", "data.batch_size=128", "run_name=big"))
    assert not (tmp_path / "runs" / "tiny" / "big").exists()


def test_nan_loss_stops_the_run(tiny):
    with pytest.raises(FloatingPointError, match="loss is nan"):
        pipeline.run(tiny("optim.lr=1e30", "run_name=nan"))


def _folder_with_a_broken_jpeg(root: Path) -> Path:
    make_image_folder(root)
    bad = root / "train" / "n02" / "0.JPEG"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated: Pillow cannot decode it
    return bad


def test_undecodable_image_is_named_or_skipped(tmp_path, capsys):
    bad = _folder_with_a_broken_jpeg(tmp_path)
    d = load_datasets("imagenet", str(tmp_path), image_size=24, seed=0)
    index = next(i for i in range(len(d.train)) if str(bad) == d.train.source.describe(i))
    with pytest.raises(DatasetError, match=f"image {index} \\({bad}\\) cannot be decoded"):
        d.train[index]
    d = load_datasets("imagenet", str(tmp_path), image_size=24, seed=0, skip_bad_images=True)
    x, y = d.train[index]  # the next decodable item stands in
    assert x.shape == (3, 24, 24) and d.train.skipped == 1
    assert str(bad) in capsys.readouterr().err


def _export(tmp_path: Path, tiny) -> Path:
    from trainer.export.torch_export import export_run

    info = pipeline.run(tiny("run_name=exp", "phases=[{kind: pretrain, epochs: 1, steps_per_epoch: 1}]"))
    return export_run(info.dir, tmp_path / "export")


@pytest.mark.parametrize("field, value, fragment", [
    ("num_classes", 10**9, "num_classes must be an integer in [1, 100000]"),
    ("image_size", -3, "image_size must be an integer in [8, 4096]"),
    ("model", "os.system", "model must be one of"),
    ("surgery", {"conv1": {"format": "svd"}}, "cannot be loaded"),
])
def test_tampered_export_is_refused_with_exit_2(tmp_path, tiny, capsys, field, value, fragment):
    out = _export(tmp_path, tiny)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest[field] = value
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["evaluate", str(out), "--no-data"]) == 2
    err = capsys.readouterr().err
    assert "export error" in err and fragment in err, err


def test_truncated_weights_are_refused_with_exit_2(tmp_path, tiny, capsys):
    out = _export(tmp_path, tiny)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    assert main(["evaluate", str(out), "--no-data"]) == 2
    assert "cannot be loaded" in capsys.readouterr().err


def test_resume_refuses_a_changed_method_and_keeps_the_original_config(tiny):
    from trainer.core.faults import InjectedFailure

    base = ("run_name=same", "phases.0.epochs=2", "debug.fail_at={phase: 0, epoch: 1}")
    with pytest.raises(InjectedFailure):
        pipeline.run(tiny(*base))
    run_dir = Path(tiny().cluster.storage) / "tiny" / "same"
    original = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"resume: .*optim.lr: 0.05 -> 0.2.*allow_config_change=true"):
        pipeline.run(tiny(*base, "resume=true", "optim.lr=0.2"))
    assert (run_dir / "config.yaml").read_text() == original
    # where and how it runs may change (here: the fault injection and the log interval)
    pipeline.run(tiny("run_name=same", "phases.0.epochs=2", "resume=true", "log_every=1", "optim.lr=0.2",
                      "allow_config_change=true"))
    assert (run_dir / "config.yaml").read_text() == original
    assert "lr: 0.2" in (run_dir / "config-resume-1.yaml").read_text()


def test_invalid_run_state_is_named(tiny):
    from trainer.core.faults import InjectedFailure

    base = ("run_name=state", "phases.0.epochs=2", "debug.fail_at={phase: 0, epoch: 1}")
    with pytest.raises(InjectedFailure):
        pipeline.run(tiny(*base))
    state = Path(tiny().cluster.storage) / "tiny" / "state" / "run.json"
    state.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{state} is not valid JSON"):
        pipeline.run(tiny(*base, "resume=true"))


def test_unreadable_config_files_are_one_line_exit_2(tmp_path, capsys):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nphases: [ {kind: pretrain\noptim: {lr: 0.1}\n")
    cases = [(latin, ["latin1.yaml", "not a UTF-8 text file", "byte 9"]),
             (tmp_path, ["is a directory", "YAML file"]),
             (broken, ["broken.yaml", "not valid YAML", "line 3"])]
    for path, fragments in cases:
        assert main(["config", "show", str(path)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err  # one line, no traceback, no YAML excerpt
        for frag in fragments:
            assert frag in err, (frag, err)


def test_cluster_down_with_no_cluster_is_nothing_to_do(tmp_path, capsys):
    assert main(["cluster", "down", "--state-dir", str(tmp_path / "none")]) == 0
    out = capsys.readouterr()
    assert "nothing to do" in out.out and "no cluster is up" in out.out and out.err == ""
