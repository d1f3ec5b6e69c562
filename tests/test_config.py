"""Config loading, overrides and every bad-input path: each message names the key and what is allowed."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.config import ConfigError, apply_overrides, flatten, from_dict, load_config, to_dict
from launcher.schema import Config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_shipped_config_loads():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files, "configs/ has no experiments"
    for f in files:
        cfg = load_config(f)
        assert cfg.name and cfg.phases


def test_overrides_reach_nested_and_list_items():
    cfg = load_config(CONFIGS / "quickstart.yaml",
                      ["optim.lr=0.05", "phases.0.epochs=3", "cluster.address=null", "data.augment=false",
                       "compression.ranks={layer1.0.conv1: [4, 4]}"])
    assert cfg.optim.lr == 0.05 and cfg.phases[0].epochs == 3
    assert cfg.cluster.address is None and cfg.data.augment is False
    assert cfg.compression.ranks == {"layer1.0.conv1": [4, 4]}


def test_fault_injection_is_an_explicit_logged_setting():
    cfg = load_config(CONFIGS / "quickstart.yaml", ["debug.fail_at={phase: 1, epoch: 2, rank: 1}"])
    assert (cfg.debug.fail_at.phase, cfg.debug.fail_at.epoch, cfg.debug.fail_at.rank) == (1, 2, 1)
    assert cfg.worker().debug == cfg.debug  # the workers get it in their typed config
    params = flatten(to_dict(cfg))  # what MLflow records
    assert params["debug.fail_at.phase"] == 1 and params["debug.fail_at.rank"] == 1
    assert flatten(to_dict(load_config(CONFIGS / "quickstart.yaml")))["debug.fail_at"] is None


def test_int_accepted_for_float_and_roundtrip():
    cfg = load_config(CONFIGS / "quickstart.yaml", ["optim.lr=1", "optim.weight_decay=5e-4"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.weight_decay == 5e-4
    assert from_dict(Config, to_dict(cfg)) == cfg


@pytest.mark.parametrize("override, fragments", [
    ("optim.lrr=1", ["optim.lrr", "unknown key", "lr, momentum"]),
    ("bogus=1", ["bogus", "unknown key", "allowed keys"]),
    ("data.dataset=mnist", ["data.dataset", "'mnist'", "'packed'", "'imagenet'"]),
    ("model.name=vgg", ["model.name", "'resnet20'", "'resnet50'"]),
    ("engine.zero_stage=3", ["engine.zero_stage", "0, 1, 2"]),
    ("engine.zero_stage=two", ["engine.zero_stage", "integer"]),
    ("optim.lr=-0.1", ["optim.lr", "> 0"]),
    ("optim.momentum=1.5", ["optim.momentum", "[0, 1)"]),
    ("data.batch_size=0", ["data.batch_size", ">= 1"]),
    ("data.batch_size=127", ["data.batch_size", "divisible"]),
    ("cluster.num_workers=0", ["cluster.num_workers", ">= 1"]),
    ("cluster.backend=slurm", ["cluster.backend", "'ray'", "'local'"]),
    ("cluster.backend=local", ["cluster.num_workers", "exactly one"]),
    ("data.augment=maybe", ["data.augment", "true/false"]),
    ("phases.0.kind=train", ["phases.0.kind", "'pretrain'", "'finetune'"]),
    ("phases.0.epochs=-1", ["phases.0.epochs", ">= 0"]),
    ("phases.9.epochs=1", ["phases.9", "list index must be 0..4"]),
    ("phases=[]", ["phases", "at least one"]),
    ("phases=[{kind: finetune}]", ["phases.0.kind", "decompose"]),
    ("compression.keep_ratio=0", ["compression.keep_ratio", "(0, 1]"]),
    ("admm.rho_max=1e-9", ["admm.rho_max", ">= rho"]),
    ("optim", ["override", "key.sub=value"]),
    ("debug.fail_at.phase=2", ["debug.fail_at.epoch", "required key is missing"]),
    ("debug.fail_at={phase: 2, epoch: 1}", ["debug.fail_at.phase", "training phase", "got 2"]),
    ("debug.fail_at={phase: 1, epoch: 3}", ["debug.fail_at.epoch", "runs 2 epochs", "got 3"]),
    ("debug.fail_at={phase: 1, epoch: 0}", ["debug.fail_at.epoch", ">= 1"]),
    ("debug.fail_at={phase: 1, epoch: 1, rank: 2}", ["debug.fail_at.rank", "cluster.num_workers (2)"]),
    ("debug.fail_at=yes", ["debug.fail_at", "expected a mapping or null"]),
])
def test_bad_input_names_key_and_allowed_values(override, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "quickstart.yaml", [override])
    for frag in fragments:
        assert frag in str(e.value), (frag, str(e.value))


def test_missing_required_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("phases: [ {kind: pretrain\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="phases.0.kind: required key is missing"):
        from_dict(Config, {"name": "x", "phases": [{"epochs": 1}]})


def test_name_defaults_to_file_stem(tmp_path):
    f = tmp_path / "myexp.yaml"
    f.write_text(yaml.safe_dump({"model": {"name": "tinycnn"}}))
    assert load_config(f).name == "myexp"


def test_apply_overrides_does_not_mutate_and_flatten():
    raw = {"a": {"b": 1}, "l": [{"x": 1}]}
    out = apply_overrides(raw, ["a.b=2", "l.0.x=3", "a.c=[1, 2]"])
    assert raw == {"a": {"b": 1}, "l": [{"x": 1}]}
    assert flatten(out) == {"a.b": 2, "a.c": [1, 2], "l.0.x": 3}


def test_cli_config_show_and_error_exit_code(capsys):
    assert main(["config", "show", str(CONFIGS / "quickstart.yaml"), "optim.lr=0.2"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["optim"]["lr"] == 0.2
    assert main(["config", "show", str(CONFIGS / "quickstart.yaml"), "engine.precision=fp16"]) == 2
    err = capsys.readouterr().err
    assert "engine.precision" in err and "'bf16'" in err


@pytest.mark.parametrize("argv,message", [
    (["export", "RUN", "--tune-batch", "-1"], "--tune-batch: every value must be >= 0"),
    (["export", "RUN", "--tune-batch", "8,16"], "--tune-batch: expected one integer"),
    (["evaluate", "EXP", "--latency-batches", "1,0"], "--latency-batches: every value must be >= 1"),
    (["evaluate", "EXP", "--latency-batches", "one"], "--latency-batches: expected comma-separated integers"),
])
def test_cli_rejects_bad_numbers(argv, message, capsys):
    from launcher.cli import main

    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_cli_names_a_missing_run_or_export(tmp_path, capsys):
    from launcher.cli import main

    assert main(["export", str(tmp_path / "nope")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--no-data"]) == 2
    assert "is not an export" in capsys.readouterr().err


def test_plan_command_prints_the_plan_without_data(capsys, monkeypatch):
    from launcher.cli import main

    monkeypatch.delenv("TDC_DATA_ROOT", raising=False)  # no data needed
    from launcher.run.pipeline import make_plan

    config = CONFIGS / "imagenet_resnet50_svd.yaml"
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    plan = make_plan(load_config(config), 1000, 224)
    assert "rank_multiple 16" in out and f"({plan.compression:.2f}x)" in out
    assert all(p.name in out for p in plan.layers)
    assert main(["plan", str(CONFIGS / "quickstart.yaml"), "compression.keep_ratio=0.01"]) == 2
    assert "compression.keep_ratio=0.01 is impossible" in capsys.readouterr().err


def test_cli_version_and_override_hint(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("tdcompress ")
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--optim.lr=0.1"]) == 2
    assert "overrides are key=value without dashes, e.g. optim.lr=0.1" in capsys.readouterr().err


def test_compare_never_creates_a_store(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["compare"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no empty mlruns.db left behind
