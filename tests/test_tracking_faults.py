"""MLflow faults: tracking degrades instead of stopping training, and run states tell what happened.

A real ``mlflow server`` (started and stopped by the test, by pid) goes away mid-run; the other tests
use the local SQLite store of the ``tiny`` fixture or a port nobody listens on. CPU only, no network.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from cluster.processes import free_port
from launcher.config import ConfigError
from launcher.run import pipeline
from trainer.core.component import ComponentBase
from trainer.core.faults import InjectedFailure
from trainer.phases import training as training_phase
from trainer.tracking import runs as tracking_runs
from trainer.tracking import tracker as tracking

TRAIN_PHASES = "phases=[{kind: pretrain, epochs: 2, steps_per_epoch: 4}, {kind: admm, epochs: 1, steps_per_epoch: 2}, " \
               "{kind: evaluate}]"


class MlflowServer:
    """``mlflow server`` on 127.0.0.1:port over one SQLite store; start() again resumes the same store."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'db'}",
               "--default-artifact-root", str(self.root / "art")]
        # No job runner: it doubles the start time and keeps SIGTERM waiting ~15 s.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}); see {self.root / 'server.log'}")
            try:
                if requests.get(self.uri + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"mlflow server not ready after {timeout}s; see {self.root / 'server.log'}")

    def stop(self) -> None:
        """SIGTERM the server's main pid (it ends its children) and wait; SIGKILL it if that hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _statuses(client, info) -> tuple[str, list[str]]:
    """Parent status and each phase's (None: the phase never started, so it has no run)."""
    return client.get_run(info.parent_id).info.status, [client.get_run(r).info.status if r else None
                                                        for r in info.phase_ids]


def _repeated_steps(client, run_id: str) -> dict[str, list[int]]:
    """Metric key -> steps it was logged at more than once in ``run_id``."""
    out = {}
    for key in client.get_run(run_id).data.metrics:
        counts = collections.Counter(m.step for m in client.get_metric_history(run_id, key))
        if any(n > 1 for n in counts.values()):
            out[key] = sorted(s for s, n in counts.items() if n > 1)
    return out


@pytest.mark.slow
def test_training_outlives_the_tracking_server_and_loses_no_metric(tiny, tmp_path, monkeypatch, capsys):
    """The server dies after the first epoch and comes back two epochs later: training goes on, nothing is lost."""
    server = MlflowServer(tmp_path / "server", free_port())
    monkeypatch.setattr(tracking, "RETRY_EVERY_S", 1.0, raising=False)  # retry soon: the test waits for the retry, not the default interval
    epochs = 5

    class Outage(ComponentBase):
        """Stops the server after epoch 1 (its step metrics are in, its epoch metrics not yet) and
        restarts it on the same port and store after epoch 3."""

        name = "outage"

        def on_epoch_end(self, loop_state) -> None:
            if loop_state.epoch == 1:
                server.stop()
            elif loop_state.epoch == 3:
                server.start()

    real_components = training_phase.components_for
    monkeypatch.setattr(training_phase, "components_for", lambda ctx, index, model: [
        *real_components(ctx, index, model), *([Outage()] if index == 0 else [])])
    try:
        server.start()
        info = pipeline.run(tiny(f"tracking.uri={server.uri}",
                                 f"phases=[{{kind: pretrain, epochs: {epochs}, steps_per_epoch: 4}}, {{kind: evaluate}}]"))
        assert server.proc.poll() is None  # the restarted server answers what follows
        client = tracking.client(server.uri)
        pre = info.phase_ids[0]
        assert [m.step for m in client.get_metric_history(pre, "train_loss")] == list(range(2, 4 * epochs + 1, 2))
        for key in ("top1", "top5", "eval_loss", "epoch_train_loss", "lr", "images_per_s"):
            steps = sorted(m.step for m in client.get_metric_history(pre, key))
            assert set(range(4, 4 * epochs + 1, 4)) <= set(steps), key
        assert sorted(m.value for m in client.get_metric_history(pre, "epoch")) == list(range(1, epochs + 1))
        assert "best_top1" in client.get_run(pre).data.metrics
        assert "top1" in client.get_run(info.phase_ids[1]).data.metrics
        parent = client.get_run(info.parent_id)
        assert "top1" in parent.data.metrics and parent.data.params["model.name"] == "tinycnn"
        assert _statuses(client, info) == ("FINISHED", ["FINISHED", "FINISHED"])
        assert not list(info.dir.glob("tracking-buffer-*"))  # everything kept was sent
        err = capsys.readouterr().err
        assert err.count("did not take a record") == 1, err  # one warning for the outage
        assert "answers again" in err
    finally:
        server.stop()


def test_unreachable_tracking_uri_fails_in_seconds_before_the_run_dir_exists(tiny, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"tracking\.uri: .*cannot be reached.*tracking\.enabled=false"):
        pipeline.run(tiny(f"tracking.uri={uri}", "run_name=nowhere"))
    assert time.monotonic() - t0 < 20
    assert not (tmp_path / "runs" / "tiny" / "nowhere").exists()


def test_resume_after_failure_finishes_every_run_and_logs_each_step_once(tiny):
    with pytest.raises(InjectedFailure):
        pipeline.run(tiny("run_name=cut", TRAIN_PHASES, "debug.fail_at={phase: 0, epoch: 1}"))
    state = json.loads((Path(tiny().cluster.storage) / "tiny" / "cut" / "run.json").read_text())
    client = tracking.client(state["tracking_uri"])
    first = pipeline.RunInfo("cut", Path(), state["tracking_uri"], state["parent_id"], state["phase_ids"])
    # The phase that was running failed; the two after it never started: they have no run.
    assert _statuses(client, first) == ("FAILED", ["FAILED", None, None])

    info = pipeline.run(tiny("run_name=cut", TRAIN_PHASES, "resume=true"))
    assert info.parent_id == state["parent_id"]
    assert _statuses(client, info) == ("FINISHED", ["FINISHED", "FINISHED", "FINISHED"])
    assert "tdcompress.killed_attempts" not in client.get_run(info.parent_id).data.tags  # it failed, nobody killed it
    for rid in (info.parent_id, *info.phase_ids):
        assert _repeated_steps(client, rid) == {}, client.get_run(rid).info.run_name
    assert "plan_compression" in client.get_run(info.parent_id).data.metrics


def test_parent_left_running_by_a_killed_driver_is_marked_killed_on_resume(tiny, monkeypatch):
    from mlflow.tracking import MlflowClient

    two = "phases=[{kind: pretrain, epochs: 1, steps_per_epoch: 2}, {kind: evaluate}]"
    with pytest.raises(InjectedFailure):  # phase 0 completes, then the run stops
        pipeline.run(tiny("run_name=k", two, "debug.fail_at={phase: 0, epoch: 1}"))
    run_dir = Path(tiny().cluster.storage) / "tiny" / "k"
    state = json.loads((run_dir / "run.json").read_text())
    client = tracking.client(state["tracking_uri"])
    # A driver killed with SIGKILL closes nothing: its runs stay RUNNING.
    for rid in (state["parent_id"], *state["phase_ids"]):
        if rid:  # the evaluate phase never started: no run
            client.update_run(rid, status="RUNNING")

    calls: list[tuple[str, str]] = []
    real = MlflowClient.set_terminated

    def spy(self, run_id, status=None, end_time=None):
        calls.append((run_id, status))
        return real(self, run_id, status, end_time)

    monkeypatch.setattr(MlflowClient, "set_terminated", spy)
    info = pipeline.run(tiny("run_name=k", two, "resume=true"))
    parent, (pre, ev) = state["parent_id"], state["phase_ids"]
    assert info.parent_id == parent and ev is None
    # First the killed attempt is recorded: the parent KILLED, the complete phase FINISHED ...
    assert calls[:2] == [(pre, "FINISHED"), (parent, "KILLED")]
    ev = info.phase_ids[1]  # created when the resume started the evaluate phase
    assert client.get_run(parent).data.tags["tdcompress.killed_attempts"] == "1"
    # ... then the resume runs the evaluate phase and ends FINISHED.
    assert _statuses(client, info) == ("FINISHED", ["FINISHED", "FINISHED"])
    assert "top1" in client.get_run(ev).data.metrics


def test_close_failure_keeps_the_run_error_and_resume_hint(tiny, monkeypatch, capsys):
    """The server is gone when a failed run closes its MLflow runs: the run's own error and the hint remain."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    def gone(*args, **kwargs):
        raise MlflowException("API request failed: Connection refused (simulated)")

    two = "phases=[{kind: pretrain, epochs: 2, steps_per_epoch: 2}, {kind: evaluate}]"
    monkeypatch.setattr(MlflowClient, "set_terminated", gone)
    with pytest.raises(InjectedFailure):
        pipeline.run(tiny("run_name=c", two, "debug.fail_at={phase: 0, epoch: 1}"))
    out = capsys.readouterr()
    assert "resume=true" in out.out and "could not close the MLflow runs" in out.err
    run_dir = Path(tiny().cluster.storage) / "tiny" / "c"
    assert json.loads((run_dir / "run.json").read_text())["mlflow_unclosed"] == "FAILED"

    monkeypatch.undo()  # the server is back: the next command records the failure, then resumes
    info = pipeline.run(tiny("run_name=c", two, "resume=true"))
    client = tracking.client(info.tracking_uri)
    assert _statuses(client, info) == ("FINISHED", ["FINISHED", "FINISHED"])
    assert "tdcompress.killed_attempts" not in client.get_run(info.parent_id).data.tags
    assert "mlflow_unclosed" not in json.loads((run_dir / "run.json").read_text())


def test_tracker_keeps_records_while_the_store_fails_and_retries_only_when_due(tmp_path, monkeypatch, capsys):
    """No raise, one warning, one attempt per retry interval (not per call), every record sent afterwards."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    run_id = client.create_run(tracking.get_or_create_experiment(uri, "t")).info.run_id
    buffer = tmp_path / "run" / "tracking-buffer-rank0.jsonl"
    t = tracking.Tracker(uri, run_id, buffer=buffer, retry_every=3600)
    t.metrics({"loss": 1.0}, 1)
    real, attempts = MlflowClient.log_batch, []

    def down(self, *args, **kwargs):
        attempts.append(1)
        raise MlflowException("API request failed: Connection refused (simulated)")

    monkeypatch.setattr(MlflowClient, "log_batch", down)
    for step in range(2, 12):
        t.metrics({"loss": float(step)}, step)  # must not raise
    t.params({"a": 1})
    assert len(attempts) == 1 and t.pending == 11  # tried once, then kept until due
    assert len(buffer.read_text().splitlines()) == 11
    assert capsys.readouterr().err.count("WARNING mlflow") == 1

    monkeypatch.setattr(MlflowClient, "log_batch", real)  # the store answers again
    assert t.flush() and t.pending == 0 and not buffer.exists()
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 12))
    assert client.get_run(run_id).data.params == {"a": "1"}
    assert "answers again" in capsys.readouterr().err


@pytest.mark.slow
def test_an_outage_across_a_phase_start_loses_no_run_and_no_step(tiny, tmp_path, monkeypatch, capsys):
    """The server dies at the end of phase 0 (its close and phase 1's opening happen while it is away) and
    comes back after phase 1's second epoch: both phase runs exist, with their times, states and every step."""
    server = MlflowServer(tmp_path / "server", free_port())
    monkeypatch.setattr(tracking, "RETRY_EVERY_S", 1.0)

    class Outage(ComponentBase):
        name = "outage"

        def __init__(self, index: int) -> None:
            self.index = index

        def on_epoch_end(self, loop_state) -> None:
            if (self.index, loop_state.epoch) == (0, 2):
                server.stop()
            elif (self.index, loop_state.epoch) == (1, 2):
                server.start()

    real_components = training_phase.components_for
    monkeypatch.setattr(training_phase, "components_for", lambda ctx, index, model: [
        *real_components(ctx, index, model), *([Outage(index)] if index < 2 else [])])
    phases_cfg = ("phases=[{kind: pretrain, epochs: 2, steps_per_epoch: 4}, "
                  "{kind: pretrain, epochs: 3, steps_per_epoch: 4, lr: 0.02}, {kind: evaluate}]")
    try:
        server.start()
        info = pipeline.run(tiny(f"tracking.uri={server.uri}", "run_name=across", phases_cfg))
        client = tracking.client(server.uri)
        kids = tracking_runs.phase_children(server.uri, info.parent_id)
        assert sorted(kids) == [0, 1, 2] and info.phase_ids == [kids[i].info.run_id for i in range(3)]
        assert all(k.info.status == "FINISHED" for k in kids.values())
        pre, fine = kids[0].info, kids[1].info
        assert [m.step for m in client.get_metric_history(pre.run_id, "train_loss")] == [2, 4, 6, 8]
        assert [m.step for m in client.get_metric_history(fine.run_id, "train_loss")] == list(range(10, 21, 2))
        assert sorted(m.step for m in client.get_metric_history(fine.run_id, "top1")) == [12, 16, 20]
        assert _repeated_steps(client, fine.run_id) == {}
        # Opened while the server was away: its times are the phase's own, not those of the replay.
        assert pre.start_time < pre.end_time <= fine.start_time < fine.end_time <= kids[2].info.start_time
        parent = client.get_run(info.parent_id)
        assert fine.run_name == f"{parent.info.run_name}-1-pretrain"
        assert client.get_run(fine.run_id).data.params["lr"] == "0.02"
        assert client.get_run(fine.run_id).data.params["epochs"] == "3"
        assert not list(info.dir.glob("tracking-buffer-*"))
        err = capsys.readouterr().err
        assert err.count("WARNING mlflow") == 1, err  # one warning for the outage, no urllib3 retry lines
        assert "Retrying" not in err and "could not open" not in err
    finally:
        server.stop()


def test_a_phase_opened_while_the_server_is_away_is_created_by_the_next_process(tmp_path, monkeypatch, capsys):
    """Opening, records and closing of a phase run kept in the buffer file by one process (server away) are
    replayed in order by the next one that uses the file (a resume, or the driver at the end): the child
    exists with its own start and end time, its params, every step and its state."""
    import time as _time

    from trainer.tracking import buffer as tracking_buffer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    parent = client.create_run(tracking.get_or_create_experiment(uri, "t"), run_name="p").info.run_id
    buffer = tmp_path / "run" / "tracking-buffer-rank0.jsonl"

    def away(self, entry):
        raise ConnectionError("Connection refused (simulated)")

    monkeypatch.setattr(tracking.Tracker, "_send", away)
    t0 = int(_time.time() * 1000)
    t = tracking_runs.start_phase_tracker(uri, parent, 0, "pretrain", {"epochs": 2, "lr": 0.1}, buffer)
    for step in (1, 2, 3):
        t.metrics({"loss": 1.0 / step}, step)
    tracking_runs.end_phase_run(t, "FINISHED")
    t1 = int(_time.time() * 1000)
    assert not t.flush(warn=False) and len(buffer.read_text().splitlines()) == 5
    assert capsys.readouterr().err.count("WARNING mlflow") == 1
    assert tracking_runs.phase_children(uri, parent) == {}

    monkeypatch.undo()  # the server answers; a new process (no shared memory) reads the file
    monkeypatch.setattr(tracking_buffer, "_OUTBOXES", {})
    monkeypatch.setattr(tracking, "_OUTAGES", set())
    _time.sleep(0.05)  # so that a replay stamped with the replay's time would be told apart
    assert tracking.Tracker(uri, parent, buffer=buffer).flush() and not buffer.exists()
    kids = tracking_runs.phase_children(uri, parent)
    assert list(kids) == [0]
    run = client.get_run(kids[0].info.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "p-0-pretrain"
    assert t0 <= run.info.start_time <= run.info.end_time <= t1  # the phase's own times, not the replay's
    assert run.data.params["epochs"] == "2" and run.data.params["lr"] == "0.1"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
