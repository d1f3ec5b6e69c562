"""Run records: export from a real MLflow SQLite store, import into a fresh one (round trip), `compare --records`
reading them with no store, and `records render` regenerating a markdown file's tables from them."""
from __future__ import annotations

import json

import pytest

from launcher.cli import main
from launcher.results.compare import parent_runs, row_of
from launcher.results.records import export_records, load_records, search_records
from launcher.results.records_import import import_records
from trainer.tracking import tracker as tracking


def _parent(client, exp: str, name: str, *, fmt: str, method: str, top1: float, status: str = "FINISHED",
            sweep: str = "s1", start: int = 1_000_000) -> str:
    """A parent run and two phase children as `tdcompress run` leaves them (per-step and per-epoch metrics)."""
    from mlflow.entities import Metric, Param

    tags = {"model": "tinycnn", "method": method, "format": fmt, "keep_ratio": "0.5", "seed": "0",
            "tdcompress.sweep": sweep, "tdcompress.command": f"tdcompress run x.yaml run_name={name}",
            "mlflow.source.git.commit": "abc123", "device": "cpu x1"}
    pid = client.create_run(exp, run_name=name, tags=tags, start_time=start).info.run_id
    params = {f"p{i:03d}": str(i) for i in range(130)}  # more than one log_batch of params
    params.update({"compression.format": fmt, "model.name": "tinycnn", "phases.0.kind": "admm",
                   "phases.0.epochs": "2", "phases.1.kind": "evaluate"})
    client.log_batch(pid, params=[Param(k, v) for k, v in params.items()][:100])
    client.log_batch(pid, params=[Param(k, v) for k, v in params.items()][100:])
    client.log_batch(pid, metrics=[Metric("top1", top1, 5, 0), Metric("dense_top1", 70.0, 5, 0),
                                   Metric("params", 700.0, 5, 0), Metric("flops", 6e5, 5, 0),
                                   Metric("system/cpu_utilization_percentage", 50.0, 5, 0)])
    kid = client.create_run(exp, run_name=f"0-admm ({name})", start_time=1_000_100, tags={
        "mlflow.parentRunId": pid, "tdcompress.phase": "admm", "tdcompress.phase_index": "0"}).info.run_id
    steps = [Metric("train_loss", 2.0 - 0.1 * s, 10 + s, s) for s in range(1, 9)]  # per step
    steps += [Metric("layers/primal/conv1", 0.1 * s, 10 + s, s) for s in range(1, 9)]  # per layer: left out
    epochs = [Metric(k, v + e, 30 + e, 4 * e) for e in (1, 2) for k, v in (("top1", top1 - 3), ("epoch", 0.0))]
    client.log_batch(kid, metrics=steps + epochs)
    client.set_terminated(kid, "FINISHED", end_time=1_050_000)
    ev = client.create_run(exp, run_name=f"1-evaluate ({name})", start_time=1_050_000, tags={
        "mlflow.parentRunId": pid, "tdcompress.phase": "evaluate", "tdcompress.phase_index": "1"}).info.run_id
    client.log_batch(ev, metrics=[Metric("top1", top1, 40, 0)])
    client.set_terminated(ev, "FINISHED", end_time=1_060_000)
    client.set_terminated(pid, status, end_time=1_060_000 + int(top1))
    return pid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("records")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    client = tracking.client(uri)
    exp = tracking.get_or_create_experiment(uri, "tdcompress")
    ids = {"a": _parent(client, exp, "a", fmt="svd", method="admm", top1=60.0),
           "b": _parent(client, exp, "b", fmt="tucker2", method="direct", top1=62.5, start=1_000_001),
           "c": _parent(client, exp, "c", fmt="tt", method="admm", top1=1.0, status="KILLED", start=1_000_002),
           "d": _parent(client, exp, "d", fmt="svd", method="direct", top1=50.0, sweep="other", start=1_000_003)}
    return uri, tmp, ids


def test_export_keeps_epoch_histories_and_is_stable(store, tmp_path):
    uri, _, ids = store
    paths = export_records(uri, "tdcompress", tmp_path / "r", filter_string="tags.`tdcompress.sweep` = 's1'")
    assert sorted(p.name for p in paths) == ["a.json", "b.json"]  # FINISHED only, the sweep's only
    rec = json.loads((tmp_path / "r" / "a.json").read_text())
    assert rec["run_id"] == ids["a"] and rec["status"] == "FINISHED" and rec["commit"] == "abc123"
    assert rec["command"] == "tdcompress run x.yaml run_name=a" and rec["wall_s"] == pytest.approx(60.06)
    assert len(rec["params"]) == 135 and rec["metrics"]["top1"] == 60.0
    assert not any(k.startswith("system/") for k in rec["metrics"])
    admm, evaluate = rec["phases"]
    assert (admm["index"], admm["kind"], evaluate["kind"]) == (0, "admm", "evaluate")
    # Per-step series kept at the epoch ends only (steps 4 and 8), per-layer series left out.
    assert admm["history"]["train_loss"] == [[4, pytest.approx(1.6)], [8, pytest.approx(1.2)]]
    assert admm["history"]["top1"] == [[4, 58.0], [8, 59.0]]
    assert not any(k.startswith("layers/") for k in admm["history"]) and "layers/primal/conv1" not in admm["metrics"]
    before = (tmp_path / "r" / "a.json").read_bytes()
    export_records(uri, "tdcompress", tmp_path / "r", names=["a"])
    assert (tmp_path / "r" / "a.json").read_bytes() == before  # same run, same bytes


def test_round_trip_through_a_new_store(store, tmp_path):
    uri, _, ids = store
    export_records(uri, "tdcompress", tmp_path / "r", include_all=True)
    new = f"sqlite:///{tmp_path / 'new.db'}"
    done = import_records(new, tmp_path / "r")
    assert sorted(n for n, _, fresh in done if fresh) == ["a", "b", "c", "d"]
    assert all(not fresh for _, _, fresh in import_records(new, tmp_path / "r"))  # again: nothing duplicated
    old_rows = {r.info.run_name: row_of(r) for r in parent_runs(uri, "tdcompress", include_all=True)}
    new_runs = parent_runs(new, "tdcompress", include_all=True)
    new_rows = {r.info.run_name: row_of(r) for r in new_runs}
    for name, row in old_rows.items():
        assert {k: v for k, v in new_rows[name].items() if k != "run_id"} == \
            {k: v for k, v in row.items() if k != "run_id"}, name
    client = tracking.client(new)
    a = next(r for r in new_runs if r.info.run_name == "a")
    assert a.data.tags["tdcompress.imported_from"] == ids["a"] and len(a.data.params) == 135
    from trainer.tracking.runs import phase_children

    kids = phase_children(new, a.info.run_id)
    assert sorted(kids) == [0, 1] and kids[0].info.status == "FINISHED"
    hist = client.get_metric_history(kids[0].info.run_id, "top1")
    assert sorted((m.step, m.value) for m in hist) == [(4, 58.0), (8, 59.0)]
    assert kids[0].data.metrics["top1"] == 59.0


def test_compare_reads_records_like_the_store(store, tmp_path, capsys):
    uri, _, _ = store
    export_records(uri, "tdcompress", tmp_path / "r", include_all=True)
    args = ["compare", "--format", "markdown", "--plot", "", "--group-by", "method,format",
            "--filter", "tags.`tdcompress.sweep` = 's1'"]
    assert main([*args, "--tracking-uri", uri]) == 0
    from_store = capsys.readouterr().out
    assert main([*args, "--records", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out == from_store and "| b |" in from_store
    assert [r.info.run_name for r in search_records(tmp_path / "r", None, include_all=True)] == ["d", "c", "b", "a"]
    code = main(["compare", "--records", str(tmp_path / "r"), "--filter", "tags.x ==== 1"])
    assert code == 2 and "--filter" in capsys.readouterr().err


def test_render_regenerates_tables_from_records(store, tmp_path, monkeypatch, capsys):
    uri, _, _ = store
    monkeypatch.chdir(tmp_path)
    export_records(uri, "tdcompress", tmp_path / "recs")
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# results\n\n<!-- tdcompress compare --records recs --format markdown --plot '' a b -->\n"
                   "stale\n<!-- end -->\ntext stays\n")
    assert main(["records", "render", str(doc), "--check"]) == 1
    assert main(["records", "render", str(doc)]) == 0
    text = doc.read_text()
    assert "stale" not in text and "| a |" in text and "| b |" in text and text.endswith("<!-- end -->\ntext stays\n")
    assert main(["records", "render", str(doc), "--check"]) == 0
    doc.write_text("<!-- tdcompress compare --format markdown -->\n<!-- end -->\n")  # a store command, no store
    assert main(["records", "render", str(doc)]) == 2 and "--records" in capsys.readouterr().err


def test_bad_records_are_named(tmp_path, capsys):
    (tmp_path / "x.json").write_text(json.dumps({"schema": "something-else"}))
    assert main(["compare", "--records", str(tmp_path)]) == 2
    assert "x.json" in capsys.readouterr().err
    with pytest.raises(Exception, match="not a directory"):
        load_records(tmp_path / "missing")
