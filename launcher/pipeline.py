"""The driver side of `tdcompress run`: run directory, MLflow runs, workers, resume.

Everything that can be checked on the driver is checked here, before Ray or
any worker starts: the config (already typed), the dataset's presence, the
run directory. The driver owns the MLflow parent run and one child per
phase; workers log into them by id (rank 0 only).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config import ConfigError, dump_yaml, flatten, to_dict
from launcher.schema import Config
from trainer import checkpoint as ckpt
from trainer import tracking
from trainer.config import COMPRESSING_PHASES
from trainer.data import DATASET_SHAPES, DatasetError, data_root, load_datasets


@dataclass
class RunInfo:
    name: str
    dir: Path
    tracking_uri: str | None
    parent_id: str | None
    phase_ids: list[str | None]


def runs_root(cfg: Config) -> Path:
    return Path(cfg.cluster.storage).resolve() / cfg.name


def resolve_run_dir(cfg: Config) -> tuple[str, Path]:
    """Pick the run directory: explicit ``run_name``, the latest one on ``resume``, else a new timestamped one."""
    root = runs_root(cfg)
    if cfg.run_name:
        path = root / cfg.run_name
        if path.exists() and not cfg.resume and ckpt.latest_checkpoint(path / "checkpoints"):
            raise ConfigError(f"run_name: {path} already holds a run; add resume=true to continue it "
                              "or choose another run_name")
        if cfg.resume and not path.exists():
            raise ConfigError(f"resume: no run {cfg.run_name!r} under {root}")
        return cfg.run_name, path
    if cfg.resume:
        earlier = sorted((p for p in root.glob("*") if (p / "run.json").is_file()),
                         key=lambda p: (p / "run.json").stat().st_mtime) if root.is_dir() else []
        if not earlier:
            raise ConfigError(f"resume: no earlier run of experiment {cfg.name!r} under {root}; "
                              "start one without resume=true")
        return earlier[-1].name, earlier[-1]
    name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return name, root / name


def check_data(cfg: Config) -> tuple[int, int]:
    """Fail on the driver if the dataset is missing (where the driver can see it); returns (classes, image size)."""
    if cfg.cluster.address and cfg.cluster.backend == "ray":
        return DATASET_SHAPES[cfg.data.dataset]  # data lives on the cluster's nodes; workers report it
    d = cfg.data
    if d.dataset == "imagenet":
        root = data_root(d.root)
        if not root or not (Path(root) / "train").is_dir():
            raise DatasetError(f"imagenet: no train/ folder under data.root={root!r}; point data.root or "
                               "TDC_DATA_ROOT at a directory with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
        return DATASET_SHAPES["imagenet"]
    sets = load_datasets(d.dataset, d.root, augment=False, seed=cfg.seed, download=d.download,
                         synthetic_train=d.synthetic_train, synthetic_eval=d.synthetic_eval)
    for key, size, split in (("train_subset", d.train_subset, sets.train), ("eval_subset", d.eval_subset, sets.eval)):
        if size > len(split):
            raise ConfigError(f"data.{key}: must be in [0, {len(split)}] for {d.dataset}, got {size}")
    return sets.num_classes, sets.image_size


def make_plan(cfg: Config, classes: int, size: int):
    """The rank plan (params/FLOPs before and after), or None when no phase compresses; errors are ConfigErrors."""
    if not any(p.kind in COMPRESSING_PHASES for p in cfg.phases):
        return None
    from admm.component import plan_for_model
    from trainer.models import build_model

    try:
        plan = plan_for_model(build_model(cfg.model.name, classes), cfg.compression, cfg.cluster.num_workers,
                              input_shape=(1, 3, size, size))
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith("compression") else f"compression: {e}") from None
    return plan


def record_plan(cfg: Config, plan, info: "RunInfo") -> None:
    """Print the plan and store it in the run directory and the MLflow parent run."""
    if plan is None:
        return
    table = plan.table()
    print(f"rank plan ({cfg.compression.format}, keep_ratio {cfg.compression.keep_ratio}, owners for "
          f"{cfg.cluster.num_workers} workers):\n{table}", flush=True)
    (info.dir / "rank_plan.txt").write_text(table + "\n")
    (info.dir / "rank_plan.json").write_text(json.dumps(plan.to_json(), indent=1))
    if info.tracking_uri:
        t = tracking.Tracker(info.tracking_uri, info.parent_id)
        t.artifact(info.dir / "rank_plan.txt")
        t.artifact(info.dir / "rank_plan.json")
        t.metrics({"plan_params_before": plan.dense_params_total, "plan_params_after": plan.params_after_total,
                   "plan_flops_before": plan.dense_flops_total, "plan_flops_after": plan.flops_after_total,
                   "plan_compression": plan.compression}, 0)


def _open_mlflow(cfg: Config, run_name: str, run_dir: Path, state: dict[str, Any]) -> tuple[str | None, str | None, list]:
    if not cfg.tracking.enabled:
        return None, None, [None] * len(cfg.phases)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    client = tracking.client(uri)
    if state.get("parent_id"):
        client.update_run(state["parent_id"], status="RUNNING")
        return uri, state["parent_id"], state["phase_ids"]
    exp = tracking.get_or_create_experiment(uri, cfg.tracking.experiment)
    parent = client.create_run(exp, run_name=run_name, tags={"tdcompress.run_dir": str(run_dir),
                                                             "tdcompress.config": cfg.name}).info.run_id
    children = []
    for i, phase in enumerate(cfg.phases):
        run = client.create_run(exp, run_name=f"{run_name}/{i}-{phase.kind}",
                                tags={"mlflow.parentRunId": parent, "tdcompress.phase": phase.kind})
        children.append(run.info.run_id)
    t = tracking.Tracker(uri, parent)
    t.params(flatten(to_dict(cfg)))
    t.text(dump_yaml(cfg), "config.yaml")
    return uri, parent, children


def _close_mlflow(info: RunInfo, status: str) -> None:
    if not info.tracking_uri:
        return
    client = tracking.client(info.tracking_uri)
    last = ckpt.latest_checkpoint(info.dir / "checkpoints")
    done = -1
    if last is not None:
        meta = ckpt.read_meta(last)
        done = meta["phase_index"] - (0 if meta["phase_done"] else 1)
    for i, rid in enumerate(info.phase_ids):
        if rid and client.get_run(rid).info.status == "RUNNING":
            client.set_terminated(rid, "FINISHED" if i <= done else status)
    client.set_terminated(info.parent_id, status)


def prepare(cfg: Config) -> RunInfo:
    name, run_dir = resolve_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_file = run_dir / "run.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    uri, parent, children = _open_mlflow(cfg, name, run_dir, state)
    state.update(run_name=name, parent_id=parent, phase_ids=children, tracking_uri=uri)
    ckpt.atomic_write_text(state_file, json.dumps(state, indent=1))
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    return RunInfo(name=name, dir=run_dir, tracking_uri=uri, parent_id=parent, phase_ids=children)


def run(cfg: Config) -> RunInfo:
    """Run (or resume) the phase sequence of ``cfg``; raises on failure after recording it."""
    from cluster.ray_runtime import run_workers
    from trainer.context import WorkerJob

    classes, size = check_data(cfg)
    plan = make_plan(cfg, classes, size)  # before anything is created: a bad plan costs nothing
    info = prepare(cfg)
    print(f"run {info.name}: {info.dir}", flush=True)
    record_plan(cfg, plan, info)
    if info.tracking_uri:
        print(f"mlflow: {info.tracking_uri} parent run {info.parent_id}", flush=True)
    # The data root is resolved here: workers on other nodes do not see this shell's variables.
    job = WorkerJob(config=cfg.worker(data_root=data_root(cfg.data.root)), run_dir=str(info.dir),
                    tracking_uri=info.tracking_uri, parent_run_id=info.parent_id, phase_run_ids=info.phase_ids,
                    use_gpu=cfg.cluster.use_gpu)
    t0 = time.time()
    try:
        run_workers(job, cfg.cluster, info.name)
    except BaseException:
        _close_mlflow(info, "FAILED")
        print(f"run {info.name} failed; continue it from its last checkpoint with: "
              f"tdcompress run CONFIG run_name={info.name} resume=true", flush=True)
        raise
    _close_mlflow(info, "FINISHED")
    print(f"run {info.name} finished in {time.time() - t0:.0f}s", flush=True)
    return info
