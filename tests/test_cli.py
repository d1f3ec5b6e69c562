"""The command line: `python -m tdcompress`, bundled configs, help on every argument, exit codes."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from launcher.cli import build_parser, main


def _actions(parser: argparse.ArgumentParser, path: str = "tdcompress"):
    """(command path, action) of every argument of ``parser`` and its subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, action


def test_python_dash_m_tdcompress_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "tdcompress", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: tdcompress" in out.stdout and "compare" in out.stdout and "configs" in out.stdout


def test_every_argument_has_help():
    missing = [f"{path} {a.dest}" for path, a in _actions(build_parser()) if not a.help]
    assert missing == []


def test_version_and_override_hint(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("tdcompress ")
    assert main(["run", "configs/quickstart.yaml", "--optim.lr=0.1"]) == 2
    assert "optim.lr=0.1" in capsys.readouterr().err


def test_configs_list_and_copy(tmp_path, capsys):
    assert main(["configs", "list"]) == 0
    listed = capsys.readouterr().out
    assert "quickstart" in listed and "cifar10_resnet20_tucker" in listed
    assert main(["configs", "copy", "quickstart", str(tmp_path)]) == 0
    copied = tmp_path / "quickstart.yaml"
    from launcher.configs_cli import bundled

    assert copied.read_text() == bundled()["quickstart"].read_text()
    capsys.readouterr()
    assert main(["configs", "copy", "quickstart", str(copied)]) == 2  # no silent overwrite
    assert "--force" in capsys.readouterr().err
    assert main(["configs", "copy", "quickstart.yaml", str(copied), "--force"]) == 0
    assert main(["configs", "copy", "nope", str(tmp_path)]) == 2
    assert "no bundled config 'nope'; one of: " in capsys.readouterr().err
    from launcher.config import load_config

    assert load_config(str(copied), []).name  # a copied config is a valid experiment


def test_a_run_time_failure_is_one_line_exit_1_and_the_traceback_is_in_driver_log(tiny, tmp_path, capsys):
    from launcher.config import dump_yaml

    cfg_file = tmp_path / "fails.yaml"
    cfg_file.write_text(dump_yaml(tiny("phases=[{kind: pretrain, epochs: 1, steps_per_epoch: 2}, {kind: evaluate}]")))
    code = main(["run", str(cfg_file), "run_name=fails", "debug.fail_at={phase: 0, epoch: 1}"])
    err = capsys.readouterr().err
    assert code == 1
    line = [x for x in err.splitlines() if x.startswith("tdcompress:")]
    assert len(line) == 1 and line[0].startswith("tdcompress: run failed: InjectedFailure: injected failure")
    assert "Traceback" not in err
    log = tmp_path / "runs" / "tiny" / "fails" / "driver.log"
    assert str(log) in line[0]
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "InjectedFailure" in text


def test_plan_overrides_may_follow_its_options(capsys):
    from launcher.cli import _parse

    for argv in (["plan", "configs/quickstart.yaml", "--run", "R", "optim.lr=0.1"],
                 ["plan", "configs/quickstart.yaml", "optim.lr=0.1", "--run", "R"]):
        args = _parse(build_parser(), argv)
        assert args.run == "R" and args.overrides == ["optim.lr=0.1"], argv
    with pytest.raises(SystemExit) as e:  # anything else left over is still refused
        _parse(build_parser(), ["plan", "configs/quickstart.yaml", "--run", "R", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
