"""The ``cluster`` config section: where and on how many workers a run executes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from admm.config import check

MAX_FAILURES = 10  # the most worker-group restarts cluster.max_failures may ask for


@dataclass
class ClusterConfig:
    # ray: Ray Train workers; local: one worker in this process, no Ray (debugging, GPU boxes without Ray).
    backend: Literal["ray", "local"] = "ray"
    address: str | None = None  # None: start an embedded local Ray; else "auto" or "ray://host:port"
    num_workers: int = 2
    use_gpu: Literal["auto", "yes", "no"] = "auto"
    cpus_per_worker: int = 1
    max_failures: int = 0  # worker-group restarts before the run fails
    storage: str = "runs"  # checkpoints and run state; shared storage on a multi-node cluster
    # The user asserts that storage is mounted at the same path on every node (cluster/storage.py):
    # required for cluster.storage and a sqlite:/// tracking store when the cluster has more than one node.
    shared_storage: bool = False
    object_store_mb: int = 512  # embedded Ray only

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        check(self.cpus_per_worker >= 1, "cpus_per_worker", f"must be >= 1, got {self.cpus_per_worker}")
        # Bounded: a deterministic error would fail every restart the same way (-1, Ray's "forever", is refused).
        check(0 <= self.max_failures <= MAX_FAILURES, "max_failures",
              f"must be in 0..{MAX_FAILURES} (restarts of the worker group, each from the newest intact "
              f"checkpoint; -1 = retry forever is not allowed), got {self.max_failures}")
        # Ray's own minimum is 75 MiB ("Attempting to cap object store memory usage at ...": a traceback at start).
        check(self.object_store_mb >= 75, "object_store_mb", f"must be >= 75 (MiB, Ray's minimum), got {self.object_store_mb}")
        check(self.backend == "ray" or self.num_workers == 1, "num_workers",
              f"backend 'local' runs exactly one worker, got {self.num_workers}")
