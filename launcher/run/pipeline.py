"""The driver side of `tdcompress run`: run directory, MLflow runs, workers, resume.

Everything that can be checked on the driver is checked here, before Ray or
any worker starts: the config (already typed), the dataset's presence, the
run directory. The driver owns the MLflow parent run and one child per
phase; workers log into them by id (rank 0 only).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from launcher.config import ConfigError, dump_yaml, flatten, from_dict, to_dict
from launcher.run.init_source import record_init, resolve_init
from launcher.run.mlflow_runs import DRIVER_BUFFER, RunInfo, close_runs, open_runs
from launcher.run.teacher_source import pin_teachers, resolve_teachers
from launcher.schema import Config
from trainer.checkpoints import files as ckpt
from trainer.config import COMPRESSING_PHASES
from trainer.data import DATASET_SHAPES, DatasetError, data_root, load_datasets
from trainer.tracking import tracker as tracking


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
    """Fail on the driver if the dataset is missing (where the driver can see it); returns (classes, image size).

    Also what this machine can check before anything starts: an embedded Ray asked for more CPUs
    than the machine has, a global batch larger than the training set.
    """
    c = cfg.cluster
    if c.backend == "ray" and not c.address:
        from cluster.ray_runtime import local_cpus

        need, have = c.num_workers * c.cpus_per_worker, local_cpus()
        if need > have:
            raise ConfigError(f"cluster.num_workers: {c.num_workers} workers x {c.cpus_per_worker} CPUs need {need} "
                              f"CPUs; this machine has {have}. Lower cluster.num_workers, or run on a cluster "
                              "(cluster.address)")
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
    n_train = d.train_subset or len(sets.train)
    if n_train < d.batch_size:
        raise ConfigError(f"data.batch_size: {d.batch_size} is more than the {n_train} training images, so no "
                          "step would run; lower data.batch_size or enlarge data.train_subset")
    calib = cfg.decompose.calibration_batches * d.batch_size
    if cfg.decompose.fit == "features" and any(p.kind == "decompose" for p in cfg.phases) and calib > n_train:
        raise ConfigError(f"decompose.calibration_batches: {cfg.decompose.calibration_batches} batches of "
                          f"data.batch_size={d.batch_size} are {calib} images, more than the {n_train} training "
                          f"images; allowed: 1..{n_train // d.batch_size}")
    return sets.num_classes, sets.image_size


def check_cluster_storage(cfg: Config) -> None:
    """A run joining a multi-node cluster: refuse node-local storage or tracking before anything of it exists."""
    if cfg.cluster.backend != "ray" or not cfg.cluster.address:
        return
    from cluster.storage import check_cluster_run

    try:
        check_cluster_run(cfg.cluster, tracking.resolve_tracking_uri(cfg.tracking.uri) if cfg.tracking.enabled
                          else None)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def make_plan(cfg: Config, classes: int, size: int):
    """The rank plan (params/FLOPs before and after), or None when no phase compresses; errors are ConfigErrors."""
    if any(p.kind == "rank_prune" for p in cfg.phases):  # a budget min_rank cannot reach fails here
        from trainer.models import build_model
        from trainer.phases.rank_prune import check_budget

        try:
            check_budget(build_model(cfg.model.name, classes), cfg)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if not any(p.kind in COMPRESSING_PHASES for p in cfg.phases):
        return None
    if cfg.compression.budget == "latency":
        # The layers must be timed as the model will be served (all of this machine's threads, one process), not
        # inside training workers that share the cores; `plan` does that and prints the overrides of its ranks.
        raise ConfigError("compression.budget=latency is planned by `tdcompress plan CONFIG [--weights W]` (it times "
                          "the layers on this device); a run takes the ranks it prints: compression.budget=params "
                          "compression.latency=null compression.keep_ratio=1 compression.ranks={...}")
    from admm.planning.model_plan import plan_for_model
    from trainer.models import build_model

    try:
        # No trained weights exist yet: with allocation=error the driver records the uniform plan as an estimate.
        plan = plan_for_model(build_model(cfg.model.name, classes), cfg.compression, cfg.cluster.num_workers,
                              input_shape=(1, 3, size, size), allocation="uniform")
    except ValueError as e:
        raise ConfigError(str(e) if str(e).startswith("compression") else f"compression: {e}") from None
    if cfg.compression.allocation == "error":
        plan.notes.append("compression.allocation=error: these are the UNIFORM ranks, an estimate made before "
                          "training; the admm phase allocates ranks from the weights it starts from and records "
                          "them in phase<i>/rank_plan.txt (and the decompose phase in its MLflow run)")
    return plan


def record_plan(cfg: Config, plan, info: RunInfo) -> None:
    """Print the plan and store it in the run directory and the MLflow parent run."""
    if plan is None:
        return
    table = plan.table()
    print(f"rank plan ({cfg.compression.format}, keep_ratio {cfg.compression.keep_ratio}, owners for "
          f"{cfg.cluster.num_workers} workers):\n{table}", flush=True)
    (info.dir / "rank_plan.txt").write_text(table + "\n")
    (info.dir / "rank_plan.json").write_text(json.dumps(plan.to_json(), indent=1))
    if info.tracking_uri and not info.resumed:  # logged again on resume, the plan_* metrics had two step-0 points
        t = tracking.Tracker(info.tracking_uri, info.parent_id, buffer=info.dir / DRIVER_BUFFER)
        t.artifact(info.dir / "rank_plan.txt")
        t.artifact(info.dir / "rank_plan.json")
        t.metrics({"plan_params_before": plan.dense_params_total, "plan_params_after": plan.params_after_total,
                   "plan_flops_before": plan.dense_flops_total, "plan_flops_after": plan.flops_after_total,
                   "plan_compression": plan.compression}, 0)


# Settings a resumed run may change: where and how it runs, how it is logged, not what it computes.
RESUME_MAY_CHANGE = ("resume", "run_name", "allow_config_change", "log_every", "cluster.", "tracking.", "debug.",
                     "data.root", "data.loader_workers", "data.skip_bad_images", "data.download")


def check_resume_config(cfg: Config, run_dir: Path, has_checkpoint: bool) -> list[str]:
    """The keys where ``cfg`` differs from the config the run in ``run_dir`` started with (none before
    its first checkpoint: ``has_checkpoint`` False).

    Raises ConfigError when the run holds a checkpoint and a key outside ``RESUME_MAY_CHANGE``
    differs (a tucker2 ADMM state resumed into an svd plan, another model...), unless
    ``allow_config_change=true``.
    """
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file() or not has_checkpoint:
        return []
    try:
        saved = flatten(to_dict(from_dict(Config, yaml.safe_load(saved_file.read_text()))))
    except (ConfigError, yaml.YAMLError) as e:
        raise ConfigError(f"resume: the run's {saved_file} cannot be read ({e}); restore it, or start a new run "
                          "without resume=true") from None
    now = flatten(to_dict(cfg))
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k)
                     and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUME_MAY_CHANGE))
    if changed and not cfg.allow_config_change:
        diff = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
        raise ConfigError(f"resume: this config differs from the one run {run_dir.name} started with ({diff}"
                          f"{'; ...' if len(changed) > 8 else ''}); resume with the same settings, or add "
                          "allow_config_change=true to continue with the new ones")
    return changed


def _read_state(state_file: Path) -> dict[str, Any]:
    if not state_file.is_file():
        return {}
    try:
        state = json.loads(state_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"resume: {state_file} is not valid JSON ({e}); it records the run's MLflow ids: "
                          "restore it, or delete it to continue the run under new MLflow runs") from None
    if not isinstance(state, dict):
        raise ConfigError(f"resume: {state_file} must hold a JSON object, got {type(state).__name__}")
    return state


def prepare(cfg: Config) -> RunInfo:
    name, run_dir = resolve_run_dir(cfg)
    has_checkpoint = ckpt.latest_checkpoint(run_dir / "checkpoints") is not None
    changed = check_resume_config(cfg, run_dir, has_checkpoint)
    state_file = run_dir / "run.json"
    state = _read_state(state_file)
    resumed = bool(state.get("parent_id"))
    # MLflow first: a tracking server that cannot be reached fails here, before the run directory exists.
    uri, parent, children = open_runs(cfg, name, run_dir, state)
    run_dir.mkdir(parents=True, exist_ok=True)
    state.pop("mlflow_unclosed", None)  # applied by open_runs
    state.update(run_name=name, parent_id=parent, phase_ids=children, tracking_uri=uri)
    ckpt.atomic_write_text(state_file, json.dumps(state, indent=1))
    if changed:  # the config the run started with stays; each changed resume leaves its own beside it
        k = 1 + len(list(run_dir.glob("config-resume-*.yaml")))
        ckpt.atomic_write_text(run_dir / f"config-resume-{k}.yaml", dump_yaml(cfg))
        print(f"resume: continuing with changed settings ({', '.join(changed)}); saved as config-resume-{k}.yaml",
              flush=True)
    elif not (run_dir / "config.yaml").is_file() or not has_checkpoint:
        ckpt.atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    return RunInfo(name=name, dir=run_dir, tracking_uri=uri, parent_id=parent, phase_ids=children,
                   resumed=resumed and parent is not None)


def run(cfg: Config) -> RunInfo:
    """Run (or resume) the phase sequence of ``cfg``; raises on failure after recording it."""
    from cluster.ray_runtime import run_workers
    from trainer.context import WorkerJob

    classes, size = check_data(cfg)
    plan = make_plan(cfg, classes, size)  # before anything is created: a bad plan costs nothing
    check_cluster_storage(cfg)
    # model.init loaded and shape-checked here, before any worker (not on a resume that has a checkpoint)
    init = resolve_init(cfg, classes, resolve_run_dir(cfg)[1] if cfg.resume else None)
    teachers = resolve_teachers(cfg, classes, resolve_run_dir(cfg)[1] if cfg.resume else None)  # distill, same checks
    info = prepare(cfg)
    print(f"run {info.name}: {info.dir}", flush=True)
    record_plan(cfg, plan, info)
    parent = tracking.Tracker(info.tracking_uri, info.parent_id, buffer=info.dir / DRIVER_BUFFER) \
        if info.tracking_uri else None
    if parent is not None:
        record_init(init, parent)
    teachers = pin_teachers(teachers, info.dir, parent)  # a resume finds the same teacher in the run directory
    if info.tracking_uri:
        print(f"mlflow: {info.tracking_uri} parent run {info.parent_id}", flush=True)
    # The data root is resolved here: workers on other nodes do not see this shell's variables.
    job = WorkerJob(config=cfg.worker(data_root=data_root(cfg.data.root)), run_dir=str(info.dir),
                    tracking_uri=info.tracking_uri, parent_run_id=info.parent_id, phase_run_ids=info.phase_ids,
                    use_gpu=cfg.cluster.use_gpu, init=init, teachers=teachers)
    t0 = time.time()
    try:
        run_workers(job, cfg.cluster, info.name)
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        try:  # close_runs raises no Exception: the error that stopped the run stays the one raised
            close_runs(info, "KILLED" if interrupted else "FAILED", error=None if interrupted else e)
        finally:
            if ckpt.latest_checkpoint(info.dir / "checkpoints") is not None:  # else there is nothing to resume
                print(f"run {info.name} {'stopped' if interrupted else 'failed'}; continue it from its last "
                      f"checkpoint with: tdcompress run CONFIG run_name={info.name} resume=true", flush=True)
        raise
    close_runs(info, "FINISHED", cfg.tracking)
    print(f"run {info.name} finished in {time.time() - t0:.0f}s", flush=True)
    return info
