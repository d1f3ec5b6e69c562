"""`tdcompress sweep`: a sweep file expands into named rows with exact commands (dense rows first, model.init at
their seed's dense run, the sweep's tag), and every mistake is refused before anything runs, naming the field."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.schema import ConfigError
from launcher.sweep.rows import command, configs, where
from launcher.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
BASE = str(REPO / "configs" / "quickstart.yaml")


def _sweep(tmp_path: Path, **changes) -> Path:
    spec = {"name": "t", "storage": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}",
            "overrides": ["model.name=tinycnn"],
            "dense": {"name": "dense-s{seed}", "config": BASE, "seeds": [0, 1],
                      "overrides": ["phases=[{kind: pretrain, epochs: 1}, {kind: evaluate}]"]},
            "grids": [{"name": "{method}-{format}-b{budget}-s{seed}", "config": BASE, "axes": {
                "method": {"admm": {"overrides": ["phases.1.epochs={admm_epochs}"]}, "direct": []},
                "format": ["svd", "tucker2"],
                "budget": {"5": {"vars": {"admm_epochs": 3}}}}}]}
    for key, value in changes.items():  # "grids__0__axes" addresses spec["grids"][0]["axes"]
        *parents, last = key.split("__")
        node = spec
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_rows_names_and_commands(tmp_path):
    sweep = load_sweep(_sweep(tmp_path))
    names = [r.name for r in sweep.rows]
    assert names[:2] == ["dense-s0", "dense-s1"]  # dense rows first
    assert names[2:] == ["admm-svd-b5-s0", "admm-svd-b5-s1", "admm-tucker2-b5-s0", "admm-tucker2-b5-s1",
                         "direct-svd-b5-s0", "direct-svd-b5-s1", "direct-tucker2-b5-s0", "direct-tucker2-b5-s1"]
    at = where(sweep)
    cfgs, dirs = configs(sweep, at)
    row = next(r for r in sweep.rows if r.name == "admm-tucker2-b5-s1")
    cmd = command(sweep, at, row, dirs, resume=False)
    assert cmd[:3] == ["tdcompress", "run", BASE]
    assert "phases.1.epochs=3" in cmd and "compression.format=tucker2" in cmd and "seed=1" in cmd
    assert f"model.init={tmp_path / 'runs' / 'quickstart' / 'dense-s1'}" in cmd
    assert "tracking.tags={tdcompress.sweep: t}" in cmd and "resume=true" not in cmd
    assert cfgs[row.name].tracking.tags == {"tdcompress.sweep": "t"} and cfgs[row.name].seed == 1
    assert cfgs[row.name].phases[1].epochs == 3 and cfgs[row.name].model.name == "tinycnn"
    assert command(sweep, at, row, dirs, resume=True)[-1] == "resume=true"


def test_dry_run_prints_every_row(tmp_path, capsys):
    assert main(["sweep", str(_sweep(tmp_path)), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 10
    assert lines[0].split()[:2] == ["dense-s0", "new"] and "tdcompress run" in lines[0]
    assert lines[2].split()[:2] == ["admm-svd-b5-s0", "waiting"]  # its dense run has not finished
    assert main(["sweep", str(_sweep(tmp_path)), "--dry-run", "--only", "nope"]) == 2


def test_a_row_another_process_runs_is_not_started(tmp_path, capsys):
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "run", "run_name=dense-s1"],
                             stdin=subprocess.PIPE)
    try:
        assert main(["sweep", str(_sweep(tmp_path)), "--dry-run", "--only", "dense-s1"]) == 0
        assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["dense-s1", "running"]
    finally:
        other.communicate(b"")  # it ends when its stdin closes: no sleeping, no kill
    assert main(["sweep", str(_sweep(tmp_path)), "--dry-run", "--only", "dense-s1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["dense-s1", "new"]


@pytest.mark.parametrize("change, field", [
    ({"colour": 1}, "sweep.colour: unknown key"),
    ({"name": "a/b"}, "name:"),
    ({"dense__seeds": [0, 0]}, "dense.seeds"),
    ({"dense__name": "dense"}, "dense.name"),
    ({"dense__config": "nope.yaml"}, "dense.config"),
    ({"dense__weights": "parents"}, "dense.weights"),
    ({"grids__0__axes__format": [True]}, "grids.0.axes.format"),
    ({"grids__0__axes__width": [1, 2]}, "grids.0.axes.width"),
    ({"grids__0__axes__method__admm": {"overrides": ["x=1"], "colour": 2}}, "grids.0.axes.method.admm.colour"),
    ({"grids__0__axes__method__admm": {"overrides": ["phases.1.epochs={nothing}"]}}, "{nothing} is not defined"),
    ({"grids__0__seeds": [2]}, "grids.0.seeds"),
    ({"grids__0__name": "{method}-s{seed}"}, "appear more than once"),
    ({"grids__0__axes__method__admm": ["optim.lr=-1"]}, "row admm-svd-b5-s0"),
])
def test_bad_sweeps_name_the_field(tmp_path, change, field, capsys):
    path = _sweep(tmp_path, **change)
    with pytest.raises(ConfigError) as e:
        sweep = load_sweep(path)
        configs(sweep, where(sweep))  # each row's config is validated too
    assert field in str(e.value)
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert field.split(":")[0] in capsys.readouterr().err


def test_kept_weights_and_records_leave_a_new_machine_only_what_is_missing(tmp_path, capsys):
    """The study outlives its machine: with a dense row's weights kept (``dense.weights``) and rows' records
    committed, a sweep on an empty storage skips what was recorded and starts the grid rows from the kept file;
    a dense row with a record but no kept weights runs again (its grid rows need the weights)."""
    import json

    from safetensors.torch import save_file

    from trainer.models import build_model

    path = _sweep(tmp_path, records=str(tmp_path / "records"), dense__weights=str(tmp_path / "parents" / "{name}"))
    kept = tmp_path / "parents" / "dense-s0" / "model.safetensors"
    kept.parent.mkdir(parents=True)
    save_file(build_model("tinycnn", 10).state_dict(), str(kept))
    (tmp_path / "records").mkdir()
    for name in ("dense-s0", "dense-s1", "admm-svd-b5-s0"):
        (tmp_path / "records" / f"{name}.json").write_text(json.dumps({"run_name": name}))

    assert main(["sweep", str(path), "--dry-run"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    status = {name: line.split()[1] for name, line in lines.items()}
    assert status["dense-s0"] == "recorded" and lines["dense-s0"].endswith("(skipped)")
    assert status["admm-svd-b5-s0"] == "recorded"
    assert status["dense-s1"] == "new"  # recorded, but its weights are not kept: it runs again
    assert status["direct-svd-b5-s0"] == "new" and f"model.init={kept}" in lines["direct-svd-b5-s0"]
    assert status["admm-svd-b5-s1"] == "waiting"
    # A run directory here wins over a record: the row is resumed, not skipped.
    sweep = load_sweep(path)
    cfgs, dirs = configs(sweep, where(sweep))
    dirs["admm-svd-b5-s0"].mkdir(parents=True)
    assert main(["sweep", str(path), "--dry-run", "--only", "admm-svd-b5-s0"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[1] == "partial"


def test_a_row_started_by_hand_is_recorded_and_tagged(tmp_path):
    """A finished row whose run another process started: its record is that of the run its run.json names,
    and the run gets the sweep's tag so `compare --filter` on it lists every row."""
    import json

    from launcher.sweep.run import export_record
    from trainer.tracking import tracker as tracking

    path = _sweep(tmp_path, records=str(tmp_path / "records"))
    sweep = load_sweep(path)
    at = where(sweep)
    cfgs, dirs = configs(sweep, at)
    client = tracking.client(at.tracking_uri)
    exp = tracking.get_or_create_experiment(at.tracking_uri, "tdcompress")
    mine = client.create_run(exp, run_name="dense-s0", start_time=1000).info.run_id
    client.set_terminated(mine, "FINISHED")
    decoy = client.create_run(exp, run_name="dense-s0", start_time=2000).info.run_id  # newer, same name, not the row's
    client.set_terminated(decoy, "FINISHED")
    dirs["dense-s0"].mkdir(parents=True)
    (dirs["dense-s0"] / "run.json").write_text(json.dumps({"parent_id": mine}))
    row = sweep.rows[0]
    out = export_record(sweep, at, row, cfgs[row.name], dirs[row.name])
    rec = json.loads(out.read_text())
    assert out.name == "dense-s0.json" and rec["run_id"] == mine and rec["tags"]["tdcompress.sweep"] == "t"
    assert "tdcompress.sweep" not in client.get_run(decoy).data.tags


def test_nice_lowers_the_process_and_its_session():
    """`sweep --nice` must make the rows yield even when the sweep runs in a session of its own (autogroup), and
    the rows' Ray must outlast minutes without CPU (its own liveness timeouts, read from the environment)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from launcher.sweep.cli import STARVED_RAY_ENV

    code = ("import os, subprocess, sys; from launcher.sweep.cli import lower_priority; lower_priority(7); "
            "ag = '/proc/self/autogroup'; "
            "print(os.nice(0), open(ag).read().split()[-1] if os.path.exists(ag) else 'none'); "
            "sys.stdout.flush(); "  # a row: a child process, what it inherits
            "subprocess.run(['printenv', 'RAY_gcs_rpc_server_reconnect_timeout_s', 'RAY_health_check_timeout_ms'])")
    env = {k: v for k, v in os.environ.items() if k not in STARVED_RAY_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         start_new_session=True).stdout.split()
    assert out[0] == str(max(7, os.nice(0)))  # at niceness 7, or left nicer (the suite itself run under `nice`)
    if Path("/proc/self/autogroup").exists():
        assert out[1] == "7"
    assert out[2:] == ["600", "60000"], out


@pytest.mark.parametrize("exits, runs, finishes", [
    ([1, 0], 2, True),    # failed while running (a crashed worker, a Ray that did not start): run again, resumed
    ([1, 1, 1], 3, False),  # 1 + --retries 2, then the row is reported not finished
    ([2], 1, False),      # bad input fails the same way every time: not retried
    ([130], 1, False),    # interrupted on purpose: not retried
])
def test_a_failed_row_runs_again_from_its_checkpoints(tmp_path, monkeypatch, capsys, exits, runs, finishes):
    """The row's process is replaced by one that exits with each code in turn (a run directory appears on the
    first, as a real run makes one); the real path, a row failing once and finishing, is test_sweep_run.py's."""
    from launcher.sweep import run as sweep_run

    sweep = load_sweep(_sweep(tmp_path))
    at = where(sweep)
    _, dirs = configs(sweep, at)
    calls = []

    def fake_row(cmd, lock_fd):
        calls.append(cmd)
        dirs["dense-s0"].mkdir(parents=True, exist_ok=True)
        return exits[len(calls) - 1]

    monkeypatch.setattr(sweep_run, "_run_local", fake_row)
    monkeypatch.setattr(sweep_run, "finished", lambda run_dir, cfg: calls and exits[len(calls) - 1] == 0)
    failed = sweep_run.run_local(sweep, at, only={"dense-s0"}, retries=2)
    assert len(calls) == runs and failed == ([] if finishes else ["dense-s0"])
    assert "resume=true" not in calls[0] and all(c[-1] == "resume=true" for c in calls[1:])
    out = capsys.readouterr().out
    assert [f"retry {k}/2, resuming" in out for k in (1, 2)] == [runs > 1, runs > 2], out


def test_retries_must_not_be_negative(tmp_path, capsys):
    assert main(["sweep", str(_sweep(tmp_path)), "--retries", "-1"]) == 2
    assert "--retries: must be 0 or more, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "study" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_expands_into_valid_configs(path, monkeypatch):
    monkeypatch.chdir(REPO)  # a sweep's config paths are relative to the repository root
    sweep = load_sweep(path)
    names = [r.name for r in sweep.rows]
    assert names and len(set(names)) == len(names)
    cfgs, _ = configs(sweep, where(sweep))
    assert set(cfgs) == set(names) and all(c.phases for c in cfgs.values())
