"""The experiment config: the sections of every package, composed.

Each package owns the dataclasses of its sections (admm: ``compression``,
``admm``; trainer: ``model``, ``data``, ``optim``, ``engine``, ``phases``,
``tracking``, ``debug``; cluster: ``cluster``) and validates them. This module
adds the run-level keys and the checks that span packages; the generic builder
in :mod:`launcher.config` checks unknown keys and types. A bad experiment file
therefore fails on the driver, before Ray or any worker starts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace

from admm.config import check
from cluster.config import ClusterConfig
from trainer.config import TrackingConfig
from trainer.worker_config import WorkerConfig


def _plain_name(text: str) -> bool:
    """A name that is one path component: no separators, no '..', nothing hidden."""
    return bool(re.fullmatch(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*", text)) and ".." not in text


class ConfigError(ValueError):
    """A config value is wrong; the message names the dotted key and what is allowed."""


@dataclass(kw_only=True)
class Config(WorkerConfig):
    """The experiment: what every worker runs (:class:`trainer.config.WorkerConfig`) plus the run's
    name and resume switch, where it runs (``cluster``) and where it is recorded (``tracking``)."""

    name: str
    resume: bool = False
    allow_config_change: bool = False  # resume even where settings that change the result differ (logged)
    run_name: str | None = None  # default: <name>-<timestamp>; resume picks the latest
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        check(_plain_name(self.name), "name", f"must be a plain name (letters, digits, '-', '_', '.'; not "
              f"starting with '.'), got {self.name!r}")
        check(self.run_name is None or _plain_name(self.run_name), "run_name",
              f"must be a plain name (letters, digits, '-', '_', '.'; not starting with '.'): it names a folder "
              f"under cluster.storage, got {self.run_name!r}")
        super().__post_init__()  # the trainer's own checks (log_every, phase order, debug.fail_at)
        split = self.optim.grad_accum * self.cluster.num_workers
        check(self.data.batch_size % split == 0, "data.batch_size",
              f"must be divisible by optim.grad_accum x cluster.num_workers ({split}), got {self.data.batch_size}")
        fail = self.debug.fail_at
        check(fail is None or fail.rank is None or fail.rank < self.cluster.num_workers, "debug.fail_at.rank",
              f"must be below cluster.num_workers ({self.cluster.num_workers}) or null, "
              f"got {fail.rank if fail else None}")

    def worker(self, data_root: str | None = None) -> WorkerConfig:
        """The part every worker runs, as a plain WorkerConfig (``data_root`` replaces ``data.root`` when given)."""
        data = self.data if data_root is None else replace(self.data, root=data_root)
        return WorkerConfig(**{f.name: getattr(self, f.name) for f in fields(WorkerConfig)} | {"data": data})
