"""`tdcompress compare` on real MLflow SQLite stores built with the public client: filters, the
FINISHED-only default, grouping over seeds, Pareto fronts, output formats, and clear errors."""
from __future__ import annotations

import csv
import io
import json

import pytest

from launcher.cli import main
from launcher.results.compare import mark_pareto
from trainer.tracking import tracker as tracking


def _run(client, exp: str, name: str, *, fmt: str, method: str = "admm", seed: int = 0, top1: float,
         params: float, flops: float, dense: float = 72.0, status: str = "FINISHED", keep: str = "0.5") -> str:
    """A parent run as `tdcompress run` leaves it: identity tags, flattened-config params, final metrics."""
    tags = {"model": "resnet20", "dataset": "packed", "method": method, "format": fmt, "keep_ratio": keep,
            "seed": str(seed), "device": "cpu x2", "tdcompress.command": f"tdcompress run configs/{name}.yaml"}
    run = client.create_run(exp, run_name=name, tags=tags)
    rid = run.info.run_id
    from mlflow.entities import Metric, Param

    config = {"compression.format": fmt, "model.name": "resnet20", "seed": seed, "phases.0.kind": "pretrain",
              "phases.0.epochs": 2, "phases.1.kind": "admm", "phases.1.epochs": 3, "phases.2.kind": "decompose",
              "phases.3.kind": "evaluate"}
    metrics = {"top1": top1, "dense_top1": dense, "decomposed_top1": top1 - 5, "params": params, "flops": flops,
               "compression": 270000 / params, "flops_reduction": 4e7 / flops}
    client.log_batch(rid, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in config.items()])  # one transaction: a fast fixture
    client.set_terminated(rid, status)
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Five parent runs (two tucker2 seeds, svd, a dense baseline, a FAILED tt) and a child run; built once
    (creating an MLflow SQLite store takes seconds), only read by the tests."""
    tmp_path = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = tracking.client(uri)
    exp = tracking.get_or_create_experiment(uri, "tdcompress")
    _run(client, exp, "tucker-s0", fmt="tucker2", seed=0, top1=70.0, params=90000, flops=1.5e7)
    _run(client, exp, "tucker-s1", fmt="tucker2", seed=1, top1=72.0, params=90000, flops=1.5e7)
    _run(client, exp, "svd", fmt="svd", top1=66.0, params=120000, flops=2.0e7)  # dominated by tucker2
    _run(client, exp, "dense", fmt="dense", method="dense", top1=73.0, params=270000, flops=4.0e7, keep="1")
    failed = _run(client, exp, "tt-failed", fmt="tt", top1=10.0, params=50000, flops=1e7, status="FAILED")
    client.create_run(exp, run_name="a child", tags={"mlflow.parentRunId": failed})
    return uri, tmp_path


def _out(capsys, *args) -> tuple[int, str, str]:
    code = main(["compare", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_finished_only_by_default_and_all_includes_the_rest(store, capsys):
    uri, tmp = store
    code, out, _ = _out(capsys, "--tracking-uri", uri, "--plot", "", "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert {r["run"] for r in rows} == {"tucker-s0", "tucker-s1", "svd", "dense"}  # no FAILED run, no child
    code, out, _ = _out(capsys, "--tracking-uri", uri, "--plot", "", "--format", "json", "--all")
    assert {r["run"] for r in json.loads(out)} == {"tucker-s0", "tucker-s1", "svd", "dense", "tt-failed"}


def test_filter_strings_select_runs(store, capsys):
    uri, _ = store
    code, out, _ = _out(capsys, "--tracking-uri", uri, "--plot", "", "--format", "csv",
                        "--filter", "params.compression.format = 'tucker2'")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and sorted(r["run"] for r in rows) == ["tucker-s0", "tucker-s1"]
    assert {r["format"] for r in rows} == {"tucker2"} and {r["model"] for r in rows} == {"resnet20"}
    code, out, err = _out(capsys, "--tracking-uri", uri, "--filter", "params.compression.format ==== 'x'")
    assert code == 2 and "--filter" in err and "Traceback" not in err


def test_group_by_gives_mean_and_std_over_seeds(store, capsys):
    uri, _ = store
    code, out, _ = _out(capsys, "--tracking-uri", uri, "--plot", "", "--format", "json", "--group-by", "method,format")
    tucker = next(r for r in json.loads(out) if r["format"] == "tucker2")
    assert code == 0 and tucker["n"] == 2
    assert tucker["top1"] == pytest.approx(71.0) and tucker["top1_std"] == pytest.approx(2 ** 0.5)
    assert tucker["seed"] == "*"  # the seeds differ within the group
    by_keys = [(r["method"], r["format"]) for r in json.loads(out)]
    assert by_keys == sorted(by_keys)  # groups sorted by their key values
    single = [r for r in json.loads(out) if r["n"] == 1]
    assert single and all(not r["run"].endswith(" runs") for r in single)  # a group of one keeps its run's name
    code, out, _ = _out(capsys, "--tracking-uri", uri, "--plot", "", "--group-by", "method,format")
    assert "71.00 ± 1.41" in out
    code, _, err = _out(capsys, "--tracking-uri", uri, "--group-by", "colour")
    assert code == 2 and "allowed: model, method" in err


def test_pareto_front_by_params_and_flops(store, capsys):
    rows = [{"top1": 70.0, "params": 100, "flops": 10}, {"top1": 69.0, "params": 50, "flops": 20},
            {"top1": 65.0, "params": 80, "flops": 30}, {"top1": None, "params": 1, "flops": 1}]
    mark_pareto(rows)
    assert [r["pareto"] for r in rows] == ["params,flops", "params", "", ""]
    uri, _ = store
    _, out, _ = _out(capsys, "--tracking-uri", uri, "--plot", "", "--format", "json")
    front = {r["run"]: r["pareto"] for r in json.loads(out)}
    assert front["svd"] == "" and front["dense"] == "params,flops" and "params" in front["tucker-s1"]


def test_markdown_carries_what_results_md_needs(store, capsys):
    uri, _ = store
    code, out, _ = _out(capsys, "--tracking-uri", uri, "--plot", "", "--format", "markdown")
    lines = out.strip().splitlines()
    assert code == 0 and lines[1].startswith("|---")
    for header in ("dense top1 %", "after decomp %", "top1 %", "delta vs dense", "params x", "FLOPs x", "epochs",
                   "wall min", "device", "seed", "command"):
        assert header in lines[0], header
    svd = next(line for line in lines if "| svd |" in line)
    assert "-6.00" in svd and "pretrain:2 admm:3 decompose evaluate" in svd and "tdcompress run configs/svd.yaml" in svd


def test_plot_is_written_and_a_bad_path_is_a_clear_error(store, capsys):
    uri, tmp = store
    png = tmp / "cmp.png"
    code, out, err = _out(capsys, "--tracking-uri", uri, "--plot", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {png}" in err
    assert "tucker-s0" in out and "FINISHED" in out
    code, _, err = _out(capsys, "--tracking-uri", uri, "--plot", str(tmp / "missing" / "cmp.png"))
    assert code == 2 and "--plot: folder" in err and "does not exist" in err and "Traceback" not in err


def test_no_store_is_created_and_an_empty_store_is_an_error(store, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = _out(capsys, "--plot", "")
    assert code == 2 and "no MLflow store at" in err and not (tmp_path / "mlruns.db").exists()
    uri, _ = store
    tracking.get_or_create_experiment(uri, "empty")  # an experiment without runs (a new store holds just that)
    code, _, err = _out(capsys, "--tracking-uri", uri, "--experiment", "empty", "--plot", "")
    assert code == 2 and "no finished runs in experiment 'empty'" in err and "--all" in err


def test_plot_draws_one_baseline_per_distinct_dense_model(tmp_path, monkeypatch):
    import matplotlib.figure

    from launcher.results import compare_plot

    rows = [{"run": "a", "model": "resnet20", "method": "admm", "format": "svd", "top1": 40.0, "params": 1e5,
             "flops": 1e7, "dense_top1": 22.6},
            {"run": "b", "model": "resnet20", "method": "admm", "format": "svd", "top1": 50.0, "params": 2e5,
             "flops": 2e7, "dense_top1": 52.2},
            {"run": "c", "model": "resnet20", "method": "direct", "format": "svd", "top1": 45.0, "params": 1.5e5,
             "flops": 1.5e7, "dense_top1": 52.2}]
    drawn: list[list[tuple[str, float]]] = []

    def keep_lines(fig, *args, **kwargs):  # the horizontal lines of every panel, as (label, y)
        for ax in fig.axes:
            drawn.append([(ln.get_label(), ln.get_ydata()[0]) for ln in ax.get_lines() if "dense" in ln.get_label()])

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep_lines)
    compare_plot.plot(rows, tmp_path / "p.png")
    assert drawn and all(sorted(y for _, y in panel) == [22.6, 52.2] for panel in drawn), drawn  # never 37.4
    assert all(label.startswith("dense baseline resnet20 ") for panel in drawn for label, _ in panel)
    many = [{**rows[0], "dense_top1": 10.0 + i} for i in range(compare_plot.MAX_BASELINES + 1)]
    assert compare_plot.baselines(many) == []  # too many to read: none rather than a wrong one
    assert compare_plot.baselines([{"top1": 1.0}]) == []
