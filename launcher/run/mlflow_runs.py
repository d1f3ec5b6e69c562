"""The MLflow runs of one `tdcompress run`: the parent (opened, reopened and closed here) and its phase runs.

The parent carries a descriptive name, the tags users filter on and the flattened config
(:mod:`launcher.run.run_record`), MLflow's system metrics while the run lasts, the dense baseline and the
delta against it, and on success the exported model. Phase runs are created by rank 0 when each phase
starts and closed when it ends (:mod:`trainer.tracking.runs`), so their times are their own and a phase
that never started has none. Run states follow what happened, also after faults: a run the driver saw
end is closed as FINISHED, FAILED or KILLED (Ctrl-C, SIGTERM); a phase run a killed worker left RUNNING
gets the run's status (FINISHED when the checkpoints say it completed); a parent found RUNNING without a
note from its driver was left by a killed driver and is marked KILLED first. Tracking problems never
replace the run's outcome.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config import ConfigError, dump_yaml, flatten, to_dict
from launcher.run import run_record
from launcher.schema import Config
from trainer.checkpoints import files as ckpt
from trainer.tracking import runs as tracking_runs
from trainer.tracking import tracker as tracking

DRIVER_BUFFER = "tracking-buffer-driver.jsonl"  # what the driver's Trackers could not send (workers: rank0)


@dataclass
class RunInfo:
    name: str
    dir: Path
    tracking_uri: str | None
    parent_id: str | None
    phase_ids: list[str | None]
    resumed: bool = False  # the MLflow runs existed before this command (they already hold the plan)


def _phases_done(run_dir: Path) -> int:
    """Index of the last phase the run's newest checkpoint says is complete (-1: none)."""
    last = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if last is None:
        return -1
    meta = ckpt.read_meta(last)
    return meta["phase_index"] - (0 if meta["phase_done"] else 1)


def _phase_status(index: int, done: int, status: str) -> str:
    """The honest end status of phase ``index``'s run, left RUNNING, of a run that ended as ``status`` with
    phases <= ``done`` complete: FINISHED when complete, else ``status`` (it was running when the run stopped).

    Phases after it never started and have no run (the index > done + 1 case only arises for runs that an
    older version created up front: KILLED, stopped before they began). A resume reopens a phase's run.
    """
    return "FINISHED" if index <= done else status if index == done + 1 else "KILLED"


# long: creating and reopening share the tags and child runs; split, each half would pass all of them
def open_runs(cfg: Config, run_name: str, run_dir: Path, state: dict[str, Any]) -> tuple[str | None, str | None, list]:
    """Create the parent and phase runs, or reopen them on resume; nothing here creates the run directory.

    A tracking server that does not answer is a ConfigError within seconds (the HTTP retries are
    bounded in ``trainer.tracking.tracker``), raised before anything of the run exists.
    """
    if not cfg.tracking.enabled:
        return None, None, [None] * len(cfg.phases)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    hint = ("start an MLflow tracking server there or point tracking.uri (or MLFLOW_TRACKING_URI) at a running "
            "one, or train without tracking: tracking.enabled=false")
    why = tracking.probe(uri)
    if why:
        raise ConfigError(f"tracking.uri: the MLflow tracking server {uri} cannot be reached ({why}); {hint}")
    from mlflow.exceptions import MlflowException

    done = _phases_done(run_dir)  # outside the try: a checkpoint problem is not an MLflow one
    try:
        client = tracking.client(uri)
        if state.get("parent_id"):
            parent = state["parent_id"]
            # What the last attempt could not send (phase runs opened while the server was away included) goes
            # first, in order, so the states set below see every phase run that attempt started.
            for kept in sorted(run_dir.glob("tracking-buffer-*.jsonl")):
                tracking.Tracker(uri, parent, buffer=kept).flush(warn=False)
            # Every exit Python sees closes the runs (close_runs; when the server was away then, it
            # noted the status in run.json), so a parent still RUNNING without that note was left by a
            # driver that died without closing it (SIGKILL, OOM killer, lost machine); one run directory
            # has one driver at a time, so nothing else runs it. Record what happened to that attempt
            # before continuing: the parent and the phase it was in KILLED, complete phases FINISHED.
            if client.get_run(parent).info.status == "RUNNING":
                ended = state.get("mlflow_unclosed") or "KILLED"
                for i, run in sorted(tracking_runs.phase_children(uri, parent).items()):
                    if run.info.status == "RUNNING":
                        client.set_terminated(run.info.run_id, _phase_status(i, done, ended))
                client.set_terminated(parent, ended)
                if ended == "KILLED":
                    killed = int(client.get_run(parent).data.tags.get("tdcompress.killed_attempts", "0")) + 1
                    client.set_tag(parent, "tdcompress.killed_attempts", str(killed))
                    print(f"mlflow: run {run_name} was left RUNNING by a driver that was killed; marked it "
                          "KILLED before resuming", flush=True)
            # The phases this command runs reopen their own child runs when they start (trainer.tracking.runs).
            client.update_run(parent, status="RUNNING")
            if tracking_runs.ERROR_TAG in client.get_run(parent).data.tags:  # the last attempt's error is not this one's
                client.delete_tag(parent, tracking_runs.ERROR_TAG)
            _start_system_metrics(cfg, uri, parent)
            kids = tracking_runs.phase_children(uri, parent)
            return uri, parent, [kids[i].info.run_id if i in kids else None for i in range(len(cfg.phases))]
        exp = tracking.get_or_create_experiment(uri, cfg.tracking.experiment)
        # Phase runs are created by rank 0 when each phase starts: their times are the phases' own.
        parent = client.create_run(exp, run_name=run_record.mlflow_run_name(cfg, run_name),
                                   tags=run_record.run_tags(cfg, run_dir)).info.run_id
        children: list[str | None] = [None] * len(cfg.phases)
    except (MlflowException, OSError) as e:
        raise ConfigError(f"tracking.uri: MLflow at {uri} failed: {tracking.short_error(e)}; {hint}") from None
    t = tracking.Tracker(uri, parent, buffer=run_dir / DRIVER_BUFFER)  # never raises: keeps what it cannot send
    params = flatten(to_dict(cfg))
    params["data.root"] = run_record.resolved_data_root(cfg)  # from TDC_DATA_ROOT when the config leaves it empty
    t.params(params)
    t.text(dump_yaml(cfg), "config.yaml")
    _start_system_metrics(cfg, uri, parent)
    return uri, parent, children


_MONITORS: dict[str, Any] = {}  # parent run id -> MLflow's SystemMetricsMonitor logging into it


def _start_system_metrics(cfg: Config, uri: str, parent: str) -> None:
    """MLflow's own system metrics (CPU, memory, disk, network; GPU with pynvml) on the parent run, sampled on
    the driver's machine every 10 s ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) while the run lasts (``tracking.system_metrics``; needs psutil)."""
    if not getattr(cfg.tracking, "system_metrics", False):
        return
    try:
        import logging

        import psutil  # noqa: F401  (MLflow's monitor needs it)
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Its start/stop lines are noise, and while the server is away it warns at every sample: the Tracker
        # says an outage once.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)

        # MLflow's own knob sets the interval where given (the tests sample every second); else every 10 s.
        interval = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or 10)
        monitor = SystemMetricsMonitor(parent, sampling_interval=interval, samples_before_logging=1, tracking_uri=uri,
                                       resume_logging=True)
        monitor.start()
        _MONITORS[parent] = monitor
    except Exception as e:  # optional: the run goes on without it
        print(f"WARNING mlflow: no system metrics ({tracking.short_error(e)})", file=sys.stderr, flush=True)


def _stop_system_metrics(parent: str | None) -> None:
    monitor = _MONITORS.pop(parent, None) if parent else None
    if monitor is not None:
        try:
            monitor.finish()
        except Exception as e:
            print(f"WARNING mlflow: system metrics did not stop cleanly ({tracking.short_error(e)})",
                  file=sys.stderr, flush=True)


def _dense_baseline(client: Any, parent: str) -> None:
    """On a finished run: ``dense_top1`` (the pretrain phase's final top-1, else the model.init model's; the
    ``dense_baseline`` tag says which) and
    ``top1_delta`` = final top-1 minus it (negative: the compressed model lost accuracy); where no decompose
    phase logged them, ``compression`` and ``flops_reduction`` against the model.init model (rank_prune)."""
    run = client.get_run(parent)
    m, tags = run.data.metrics, run.data.tags
    dense = m.get("dense_top1", m.get("init_top1"))
    if dense is None or "top1" not in m:
        return
    extra = {"top1_delta": m["top1"] - dense}
    if "dense_top1" not in m:
        extra["dense_top1"] = dense
        # Name the baseline: the model.init model, evaluated at the start of this run.
        client.set_tag(parent, "dense_baseline", f"model.init {tags.get('tdcompress.init.spec', '')} top-1".strip())
    for ratio, before, after in (("compression", "init_params", "params"), ("flops_reduction", "init_flops", "flops")):
        if ratio not in m and m.get(before) and m.get(after):
            extra[ratio] = m[before] / m[after]
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in extra.items()])


def _note_phase_ids(info: RunInfo) -> None:
    """Write the phase runs' ids (None: the phase never started) into run.json, for tools and tests."""
    state_file = info.dir / "run.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        ckpt.atomic_write_text(state_file, json.dumps({**state, "phase_ids": info.phase_ids}, indent=1))


def log_model(info: RunInfo, client: Any, register_as: str | None) -> None:
    """Export the finished run's model and log it as the parent's ``model/`` artifact: an MLflow model
    (ONNX flavor, loads with ``mlflow.pyfunc.load_model``) that also holds the torch export (safetensors +
    JSON manifest, loads with torch alone; launcher/run/mlflow_model.py); with ``register_as`` also as a new
    version of that registered model. Never raises: a run that trained is not failed by its model's logging.
    A model that cannot be written as ONNX is logged as the torch export alone, with a warning saying so."""
    try:
        import tempfile

        from launcher.run.mlflow_model import save_mlflow_model
        from trainer.export.torch_export import export_run

        out = export_run(info.dir)
        with tempfile.TemporaryDirectory(prefix="tdc-mlflow-model-") as tmp:
            try:
                staged = save_mlflow_model(out, Path(tmp) / "model")
            except Exception as e:
                print(f"WARNING mlflow: the model is logged as safetensors + manifest only, not as an MLflow "
                      f"(pyfunc) model: its ONNX export failed ({type(e).__name__}: {tracking.short_error(e)})",
                      file=sys.stderr, flush=True)
                staged = out
            client.log_artifacts(info.parent_id, str(staged), "model")
        if register_as:
            from mlflow.exceptions import MlflowException

            try:
                client.create_registered_model(register_as)
            except MlflowException as e:
                if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
                    raise
            source = client.get_run(info.parent_id).info.artifact_uri.rstrip("/") + "/model"
            version = client.create_model_version(register_as, source, run_id=info.parent_id)
            print(f"mlflow: registered the model as {register_as} version {version.version}", flush=True)
    except Exception as e:
        print(f"WARNING mlflow: the run's model was not logged ({type(e).__name__}: {tracking.short_error(e)})",
              file=sys.stderr, flush=True)


def close_runs(info: RunInfo, status: str, tracking_cfg: Any = None, error: BaseException | None = None) -> None:
    """Send kept tracking records and close the MLflow runs; never raises an Exception.

    ``error`` (a FAILED run): tagged on the parent, and on a phase run this closes FAILED that has no error
    tag of its own (its worker ended before it could close it).

    A tracking problem here must not replace the outcome of the run: it becomes one warning, and
    the calls are bounded (the HTTP retries of ``trainer.tracking.tracker``; nothing more is tried once
    the server has not answered), and ``status`` is noted in run.json for the next command to
    apply. Phase statuses: :func:`_phase_status` (``status`` is FAILED, or KILLED on Ctrl-C).
    """
    if not info.tracking_uri:
        return
    try:
        # Records the driver's or the workers' Trackers kept (the workers are done): send them now.
        kept = sorted({info.dir / DRIVER_BUFFER, *info.dir.glob("tracking-buffer-*.jsonl")})
        if not all(tracking.Tracker(info.tracking_uri, info.parent_id, buffer=f).flush() for f in kept
                   if f.is_file()):
            raise ConnectionError("the kept tracking records could not be sent")
        _stop_system_metrics(info.parent_id)
        client = tracking.client(info.tracking_uri)
        done = _phases_done(info.dir)
        children = tracking_runs.phase_children(info.tracking_uri, info.parent_id)
        why = tracking_runs.error_text(error) if error is not None and status == "FAILED" else None
        for i, run in sorted(children.items()):  # left RUNNING by a worker that did not close it (killed)
            if run.info.status == "RUNNING":
                ended = _phase_status(i, done, status)
                if ended == "FAILED" and why and tracking_runs.ERROR_TAG not in run.data.tags:
                    client.set_tag(run.info.run_id, tracking_runs.ERROR_TAG, why)
                client.set_terminated(run.info.run_id, ended)
        if why:
            client.set_tag(info.parent_id, tracking_runs.ERROR_TAG, why)
        info.phase_ids = [children[i].info.run_id if i in children else None for i in range(len(info.phase_ids))]
        _note_phase_ids(info)
        if status == "FINISHED":
            _dense_baseline(client, info.parent_id)
            if tracking_cfg is not None and tracking_cfg.log_model:
                log_model(info, client, tracking_cfg.register_as)
        client.set_terminated(info.parent_id, status)
    except Exception as e:
        print(f"WARNING mlflow: could not close the MLflow runs of {info.name} as {status} at {info.tracking_uri} "
              f"({tracking.short_error(e)}); the next `tdcompress run CONFIG run_name={info.name} resume=true` "
              "that reaches the server does", file=sys.stderr, flush=True)
        try:
            state_file = info.dir / "run.json"
            state = json.loads(state_file.read_text())
            ckpt.atomic_write_text(state_file, json.dumps({**state, "mlflow_unclosed": status}, indent=1))
        except Exception as e2:
            print(f"WARNING: could not note the run's status in {info.dir / 'run.json'}: {e2}", file=sys.stderr,
                  flush=True)
