"""`tdcompress submit|jobs|cluster`: run experiments as Ray Jobs on a cluster, and a local cluster to try it on.

`submit` checks on this machine everything the config alone can tell (keys, rank plan, storage and
tracking for a multi-node cluster) and submits nothing when a check fails; then the job runs
`python -m launcher.cli run CONFIG ... cluster.address=auto` in the uploaded project, with absolute
paths for the run storage and the MLflow store (a relative path would land in Ray's per-job
working-dir cache) and the data root and tracking URI in the job's environment.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.config import ConfigError, load_config

PROJECT = Path(__file__).resolve().parents[1]


@dataclass
class Submission:
    """What `submit` sends: the command, its environment, and where the run's records will be."""

    entrypoint: str
    env_vars: dict[str, str]
    run_name: str
    run_dir: str
    tracking_uri: str | None
    notes: list[str]


def _has(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def _loopback_url(url: str) -> bool:
    """True for http(s)://127.x.x.x, localhost or [::1]: a server only this machine can reach."""
    import ipaddress
    import urllib.parse

    host = urllib.parse.urlparse(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def _absolute_sqlite(uri: str) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db`` (against this shell's directory)."""
    path = uri[len("sqlite:///"):]
    return uri if path.startswith("/") else f"sqlite:///{Path(path).resolve()}"


# long: one check per cluster setting, in the order a user meets them
def plan_submission(config: str, overrides: list[str], nodes: int | None, same_host: bool,
                    cluster_mlflow: str | None, env: dict[str, str]) -> Submission:
    """Validate ``config`` + ``overrides`` for a cluster of ``nodes`` nodes (None: unknown) and build the job.

    Raises ConfigError (naming the key) for anything that would fail on the cluster. ``same_host``:
    every node runs on this machine (`cluster up`), so cluster.storage is shared unless the overrides
    say otherwise. ``cluster_mlflow``: the tracking server of that cluster, used when neither the
    config nor $MLFLOW_TRACKING_URI names one.
    """
    from cluster.storage import is_uri, storage_problem, tracking_problem
    from launcher.run.pipeline import check_data, make_plan
    from trainer.data import ROOT_ENV

    path = Path(config).resolve()
    if not path.is_file():
        raise ConfigError(f"config file {config} does not exist (see configs/ for examples)")
    if not path.is_relative_to(PROJECT):
        raise ConfigError(f"config file {path} must be inside the project directory {PROJECT}: the project is what "
                          "the job uploads")
    cfg = load_config(path, overrides)
    notes: list[str] = []
    extra = ["cluster.backend=ray"]
    if not (cfg.cluster.address or "").startswith("ray://"):
        extra.append("cluster.address=auto")
    if not is_uri(cfg.cluster.storage) and not Path(cfg.cluster.storage).is_absolute():
        extra.append(f"cluster.storage={Path(cfg.cluster.storage).resolve()}")
    if same_host and not _has(overrides, "cluster.shared_storage"):
        extra.append("cluster.shared_storage=true")
        notes.append("cluster.shared_storage=true: every node of this cluster runs on this machine (one filesystem)")
    uri = None
    if cfg.tracking.enabled:
        uri = cfg.tracking.uri or env.get("MLFLOW_TRACKING_URI") or cluster_mlflow or "sqlite:///mlruns.db"
        uri = _absolute_sqlite(uri) if uri.startswith("sqlite:///") else uri
        extra.append(f"tracking.uri={uri}")
    run_name = cfg.run_name or (None if cfg.resume else f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_name and not cfg.run_name:
        extra.append(f"run_name={run_name}")
    cfg = load_config(path, [*overrides, *extra])
    classes, size = check_data(cfg)  # with an address: the dataset's shape; the data lives on the nodes
    make_plan(cfg, classes, size)
    if nodes is not None:
        storage = cfg.cluster.storage
        problem = storage_problem(storage, cfg.cluster.shared_storage, nodes) or (
            tracking_problem(uri, storage, cfg.cluster.shared_storage, nodes) if uri else None)
        if problem:
            raise ConfigError(problem)
    if uri:
        from trainer.tracking import tracker as tracking

        why = tracking.probe(uri)
        if why and _loopback_url(uri):  # on this machine: the cluster's nodes see what this shell sees
            raise ConfigError(f"tracking.uri: the MLflow tracking server {uri} cannot be reached from here ({why}); "
                              "start it or point tracking.uri at a running one (tracking.enabled=false: no tracking)")
        if why:  # e.g. a server on the head's private address, reached from the cluster but not from a laptop
            notes.append(f"tracking.uri: {uri} does not answer from here ({why}); the job's driver checks it on the "
                         "cluster and stops before anything is created if it cannot reach it either")
    env_vars = {}
    if env.get(ROOT_ENV):
        env_vars[ROOT_ENV] = str(Path(env[ROOT_ENV]).resolve())
    if uri:
        env_vars["MLFLOW_TRACKING_URI"] = uri
    from launcher.run.run_record import GIT_COMMIT_ENV, git_commit

    commit = git_commit()  # the job's upload leaves .git behind: its driver records this one
    if commit:
        env_vars[GIT_COMMIT_ENV] = commit
    args = ["python", "-m", "launcher.cli", "run", str(path.relative_to(PROJECT)), *overrides, *extra]
    run_dir = f"{cfg.cluster.storage}/{cfg.name}/{run_name or '<latest run>'}"
    return Submission(entrypoint=shlex.join(args), env_vars=env_vars, run_name=run_name or "", run_dir=run_dir,
                      tracking_uri=uri, notes=notes)


def _target(args: argparse.Namespace):
    from cluster import jobs

    return jobs.resolve_target(args.address, args.state_dir)


def _cmd_submit(args: argparse.Namespace) -> int:
    import os

    from cluster import jobs

    overrides = list(args.overrides)
    if args.resume:  # --resume RUN: the run's own name and resume=true (continues from its newest checkpoint)
        named = [o.split("=", 1)[1].strip() for o in overrides if o.split("=", 1)[0].strip() == "run_name"]
        if any(n != args.resume for n in named):
            raise ConfigError(f"--resume {args.resume} and run_name={named[0]} name different runs; give one")
        overrides += [f"run_name={args.resume}", "resume=true"]
    target = _target(args)
    jobs.probe(target)
    st = target.state
    sub = plan_submission(args.config, overrides, len(st.nodes) if st else None, bool(st and st.same_host),
                          st.mlflow_uri if st else None, dict(os.environ))
    for note in sub.notes:
        print(f"note: {note}")
    job_id = f"tdc-{sub.run_name or Path(args.config).stem}-{int(time.time()) % 100000}"
    job_id = jobs.submit(target, sub.entrypoint, str(PROJECT), sub.env_vars, job_id,
                         {"tdcompress_config": args.config, "run_name": sub.run_name})
    print(f"job {job_id} submitted to {target.url}\n  entrypoint: {sub.entrypoint}\n  dashboard:  {target.url}"
          f"\n  run dir:    {sub.run_dir}\n  mlflow:     {sub.tracking_uri or 'off'} (experiment tdcompress, run "
          f"{sub.run_name or 'the resumed one'})\n  watch:      tdcompress jobs logs {job_id} --follow")
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    from cluster import jobs

    target = _target(args)
    if args.jobs_command == "list":
        for j in jobs.list_jobs(target):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
            print(f"{j.submission_id or j.job_id}  {j.status.value if hasattr(j.status, 'value') else j.status:9}  "
                  f"{started}  {j.entrypoint[:80]}")
        return 0
    if args.jobs_command == "status":
        info = jobs.status(target, args.job)
        status = info.status.value if hasattr(info.status, "value") else info.status
        print(f"{args.job}: {status}" + (f" ({info.message})" if info.message else ""))
        return 0 if status != "FAILED" else 1
    if args.jobs_command == "logs":
        if args.follow:
            for chunk in jobs.follow(target, args.job):
                print(chunk, end="", flush=True)
            info = jobs.status(target, args.job)
            status = info.status.value if hasattr(info.status, "value") else info.status
            print(f"\njob {args.job}: {status}")
            return 0 if status == "SUCCEEDED" else 1
        print(jobs.logs(target, args.job), end="")
        return 0
    stopped = jobs.stop(target, args.job)
    print(f"job {args.job}: {'stop requested' if stopped else 'was not running'}")
    return 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    from cluster import local_cluster

    if args.cluster_command == "up":
        st = local_cluster.up(args.nodes, args.cpus_per_node, args.mlflow, args.state_dir)
        print(f"cluster up: {len(st.nodes)} nodes x {st.cpus_per_node} CPU on 127.0.0.1 (state {st.dir}/cluster.json)"
              f"\n  dashboard / job server: {st.dashboard_url} (token auth: export RAY_AUTH_MODE=token "
              f"RAY_AUTH_TOKEN_PATH={st.token_path} for Ray's own CLI)\n  GCS: {st.gcs_address}"
              f"\n  mlflow: {st.mlflow_uri or 'not started (--no-mlflow)'}"
              f"\n  submit: tdcompress submit configs/quickstart.yaml\n  stop:   tdcompress cluster down")
        return 0
    recorded = (local_cluster.state_dir(args.state_dir) / local_cluster.STATE_FILE).is_file()
    stopped = local_cluster.down(args.state_dir)
    if not stopped:  # stopping what is not running is done already: not an error
        why = "nothing it recorded was still running (state file removed)" if recorded else "no cluster is up"
        print(f"cluster down: nothing to do; {why} (state {local_cluster.state_dir(args.state_dir)})")
        return 0
    print(f"cluster down: stopped process groups {', '.join(map(str, stopped))}")
    return 0


def _guarded(func):
    """Job and cluster errors are the user's to fix: message and exit 2, no traceback."""

    def run(args: argparse.Namespace) -> int:
        from cluster.jobs import JobsError
        from cluster.local_cluster import ClusterError

        try:
            return func(args)
        except (JobsError, ClusterError) as e:
            print(f"tdcompress: {e}", file=sys.stderr)
            return 2

    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the Ray job server, http://HEAD:8265 (default: $RAY_ADDRESS, else the cluster "
                                     "`tdcompress cluster up` started)")
    p.add_argument("--state-dir", help="state dir of `tdcompress cluster up` (default: $TDC_CLUSTER_DIR, else "
                                       "~/.tdcompress/cluster)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``submit``, ``jobs`` and ``cluster`` on the CLI's subparsers."""
    s = sub.add_parser("submit", help="run an experiment as a Ray Job on a cluster (checked here first)")
    s.add_argument("config", help="YAML experiment file inside the project, e.g. configs/quickstart.yaml")
    s.add_argument("overrides", nargs="*", help="key.sub=value overrides; resume=true continues the latest run")
    s.add_argument("--resume", metavar="RUN", help="continue run RUN (its run_name) from its newest checkpoint, e.g. "
                   "after its job's driver died (same as run_name=RUN resume=true)")
    _common(s)
    s.set_defaults(func=_guarded(_cmd_submit))

    j = sub.add_parser("jobs", help="list, watch and stop Ray Jobs")
    jsub = j.add_subparsers(dest="jobs_command", required=True)
    for name, helptext in (("list", "every job of the cluster"), ("status", "a job's status"),
                           ("logs", "a job's output"), ("stop", "stop a job")):
        p = jsub.add_parser(name, help=helptext)
        if name != "list":
            p.add_argument("job", help="job id printed by `tdcompress submit`")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream the log until the job ends")
        _common(p)
        p.set_defaults(func=_guarded(_cmd_jobs))

    c = sub.add_parser("cluster", help="a multi-node Ray cluster + MLflow server on this machine (127.0.0.1)")
    csub = c.add_subparsers(dest="cluster_command", required=True)
    u = csub.add_parser("up", help="start a head and N-1 worker nodes (`ray start`) and an MLflow server")
    u.add_argument("--nodes", type=int, default=2, help="Ray nodes: one head plus N-1 workers (default 2)")
    u.add_argument("--cpus-per-node", type=int, default=1, help="CPUs each node offers to Ray (default 1)")
    u.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=True,
                   help="start an MLflow tracking server for the cluster's runs (default on)")
    u.add_argument("--state-dir", help="where the state file, logs and token go (default $TDC_CLUSTER_DIR, "
                   "else ~/.tdcompress/cluster)")
    u.set_defaults(func=_guarded(_cmd_cluster))
    d = csub.add_parser("down", help="stop exactly the processes `cluster up` started")
    d.add_argument("--state-dir", help="the state dir `cluster up` used (default $TDC_CLUSTER_DIR, "
                   "else ~/.tdcompress/cluster)")
    d.set_defaults(func=_guarded(_cmd_cluster))
