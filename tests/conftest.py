"""Shared pytest fixtures."""

from __future__ import annotations

import functools
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from launcher.schema import Config


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The packed CIFAR-10 directory (train.npz, test.npz): $TDC_DATA_ROOT, else ../shared/data/cifar10.

    Required, never skipped: the data tests are meaningless without real data.
    """
    env = os.environ.get("TDC_DATA_ROOT")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
    missing = [f for f in ("train.npz", "test.npz") if not (root / f).is_file()]
    if missing:
        pytest.fail(
            f"packed CIFAR-10 data is required but {missing} not found in {root}; "
            "set TDC_DATA_ROOT to a directory holding train.npz and test.npz "
            "(layout: shared/data/cifar10/README.md)",
            pytrace=False,
        )
    return root


@functools.cache
def _mlflow_template() -> Path:
    """An empty MLflow SQLite database (its tables made), made once per test process, removed at its exit."""
    import atexit
    import shutil
    import tempfile

    from mlflow.tracking import MlflowClient

    made = tempfile.mkdtemp(prefix="tdc-mlflow-template-")
    atexit.register(shutil.rmtree, made, True)
    template = Path(made) / "mlflow.db"
    MlflowClient(f"sqlite:///{template}").search_experiments()  # makes the tables
    return template


def empty_mlflow_db(path: Path) -> Path:
    """``path`` as an empty MLflow SQLite database, unless it exists already: a copy of :func:`_mlflow_template`.

    MLflow makes a new database's tables by running its ~60 migrations, about 3 s of CPU, which every
    seconds-long run of the suite paid again. Runs that start from a fresh database of their own still do
    (the quickstart, the tracking-fault tests).
    """
    import shutil

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_mlflow_template(), path)
    return path


def tiny_config(tmp_path: Path, data_root: Path, **sections) -> Config:
    """A seconds-long run: tinycnn (no BatchNorm) on a real CIFAR-10 subset, local MLflow in tmp_path.

    ``sections`` are override strings keyed by anything (``phases="[...]"`` style is not used):
    pass them as ``overrides=[...]``.
    """
    from launcher.config import apply_overrides, from_dict

    overrides = [
        "model.name=tinycnn", "data.dataset=packed", f"data.root={data_root}", "data.batch_size=64",
        "data.train_subset=512", "data.eval_subset=256", "data.eval_batch_size=128", "optim.lr=0.05",
        "cluster.backend=local", "cluster.num_workers=1", f"cluster.storage={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{empty_mlflow_db(tmp_path / 'mlflow.db')}", "log_every=2",
        # The run's model as an MLflow artifact (an ONNX export, ~7 s a run): on where a test reads it
        # (test_mlflow_records.py).
        "tracking.log_model=false",
        "phases=[{kind: pretrain, epochs: 2, steps_per_epoch: 4}, {kind: evaluate}]",
        *sections.get("overrides", []),
    ]
    # Built from the schema defaults, not from a shipped config, so tuning configs/ never changes the tests.
    return from_dict(Config, apply_overrides({"name": "tiny"}, overrides))


# A run for the session's cluster (tests/test_cluster_*.py): tinycnn on a real CIFAR-10 subset, pretrain and ADMM
# on 2 workers (one per 1-CPU node), a few steps each, with configs/quickstart.yaml as the base.
CLUSTER_TINY = ["model.name=tinycnn", "data.train_subset=512", "data.eval_subset=256", "data.batch_size=64",
                "data.eval_batch_size=128", "log_every=1", "compression.format=svd", "compression.exclude=[]",
                "compression.min_channels=3", "cluster.num_workers=2", "admm.unit=step", "admm.interval=2",
                "tracking.log_model=false",
                "phases=[{kind: pretrain, epochs: 1, steps_per_epoch: 3}, {kind: admm, epochs: 1, steps_per_epoch: 4},"
                " {kind: evaluate}]"]


def make_image_folder(root: Path, wnids: tuple[str, ...] = ("n01", "n02"), per_class: int = 2) -> None:
    """A tiny ImageNet-style tree: root/{train,val}/<wnid>/<k>.JPEG, random 50x40 RGB images (seeded)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for wnid in wnids:
            (root / split / wnid).mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
                    root / split / wnid / f"{k}.JPEG")


@pytest.fixture
def tiny(tmp_path, cifar_root):
    """Factory: ``tiny(*overrides)`` -> Config for a seconds-long run in tmp_path."""
    return lambda *overrides: tiny_config(tmp_path, cifar_root, overrides=list(overrides))


def pids_naming(markers: tuple[str, ...]) -> list[int]:
    """Pids of every process whose command line contains one of ``markers`` (e.g. a cluster's state dir)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if any(m.encode() in cmdline.read_bytes() for m in markers):
                out.append(int(cmdline.parent.name))
        except OSError:
            pass
    return out


@contextmanager
def local_cluster_up(directory: Path, nodes: int, cli: bool = False) -> Iterator:
    """`tdcompress cluster up --nodes N` in ``directory`` (head + N-1 worker nodes, MLflow server), yielding its
    state; on exit `cluster down`, then fail if any process naming the state dir or a node's temp dir lives on.
    ``cli``: start it through the command line (`main([...])`) instead of ``local_cluster.up``."""
    from cluster import local_cluster
    from launcher.cli import main

    markers = (str(directory), local_cluster._ray_temp_dir(directory))  # the workers' temp dirs start with the head's
    try:
        if cli:
            assert main(["cluster", "up", "--nodes", str(nodes), "--state-dir", str(directory)]) == 0
            yield local_cluster.read_state(directory)
        else:
            yield local_cluster.up(nodes, 1, mlflow=True, directory=directory)
    finally:
        if local_cluster.read_state(directory):
            local_cluster.down(directory)
        deadline = time.monotonic() + 30
        while pids_naming(markers) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not pids_naming(markers), f"processes of the cluster left running: {pids_naming(markers)}"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One `tdcompress cluster up --nodes 3` (separate `ray start` processes on 127.0.0.1, one CPU each, plus its
    MLflow server) shared by every cluster test of the session, stopped by the pids its state file records.

    Three nodes: the node-failure test kills one holding a worker, and the 2-worker runs after it still find two.
    """
    with local_cluster_up(tmp_path_factory.mktemp("cluster"), 3, cli=True) as state:
        yield state


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or ::ffff:127.x (an IPv4 loopback address on a dual-stack socket)."""
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def process_tree(pid: int) -> set[int]:
    """``pid`` and all its descendants now (empty when it is gone)."""
    import psutil

    try:
        return {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
    except psutil.Error:
        return set()


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def listeners(pids: set[int]) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, command line) of every TCP socket in LISTEN state owned by one of ``pids``,
    IPv4 and IPv6 (what /proc/net/tcp{,6} list, matched to the pids' socket inodes by psutil)."""
    import psutil

    return [(c.laddr.ip, c.laddr.port, c.pid, cmdline(c.pid)[:80]) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


def wait_for_path(path: Path, alive, timeout: float = 600, what: str = "the run") -> None:
    """Until ``path`` exists (a state the run reaches, not a log line); fails at once when ``alive()`` turns false."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not alive():
            raise AssertionError(f"{what} ended before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {path} after {timeout} s")
        time.sleep(0.5)


# Files that take a minute or more: scheduled first so that, under `pytest -n N` (make test), the workers
# do not end with one of them alone on a long file (xdist keeps the collection's order of files only with
# --no-loadscope-reorder; by default it hands out the files with the most tests first).
_LONG_FILES = ("test_cluster_jobs.py", "test_cluster_ray_cli.py", "test_distributed_ray.py", "test_decompose_phase.py",
               "test_sweep_run.py", "test_rank_prune.py", "test_distill.py", "test_admm_phase.py")
# Files that share the session's `cluster up` fixture: one xdist worker runs them all, so one cluster starts.
_CLUSTER_FILES = ("test_cluster_jobs.py", "test_cluster_ray_cli.py")


def pytest_configure(config) -> None:
    """Under ``pytest -n N`` each worker gets its share of the cores: torch's and OpenMP's threads spin while they
    wait, so N workers with a thread per core each spent more CPU than the tests needed.

    Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and each
    step of a run's start and end waits for a poll: a seconds-long run spent ~4.5 s of its ~27 s there. Every
    Ray process of the suite (embedded instances, `ray start` nodes, job drivers) inherits 0.5 s from here.
    """
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the processes a test starts
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items) -> None:
    """The long files first (every worker collects the same order; xdist hands out files in it)."""
    rank = {name: i for i, name in enumerate(_LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept inside each rank


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the cluster files as one unit: a file's tests stay on one worker (its module
    fixtures are built once) and the files that share the session's cluster on the same one (one cluster)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ClusterFilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "cluster tests" if Path(path).name in _CLUSTER_FILES else path

    return ClusterFilesTogether(config, log)
