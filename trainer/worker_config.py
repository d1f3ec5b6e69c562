"""The typed config a worker runs, and the checks that span its sections.

:class:`WorkerConfig` is what the driver hands every worker: the trainer's sections
(:mod:`trainer.config`) plus the method's (``compression``, ``admm``), already typed
and checked, so no worker parses anything. Each section checks its own fields; the
functions here check what one section needs of another (a ``ValueError`` naming the
dotted key).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from admm.config import AdmmConfig, CompressionConfig, check
from trainer.config import (
    TRAINING_PHASES,
    DataConfig,
    DebugConfig,
    DecomposeConfig,
    EngineConfig,
    FailAt,
    HoldAt,
    ModelConfig,
    OptimConfig,
    PhaseConfig,
    RankPruneConfig,
)


@dataclass(kw_only=True)
class WorkerConfig:
    """Everything a worker runs, typed and validated (the launcher's experiment config extends it)."""

    seed: int = 0
    log_every: int = 50  # optimizer steps between progress lines / metric logs
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    admm: AdmmConfig = field(default_factory=AdmmConfig)
    decompose: DecomposeConfig = field(default_factory=DecomposeConfig)
    rank_prune: RankPruneConfig = field(default_factory=RankPruneConfig)
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig("pretrain"), PhaseConfig("evaluate")])
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check_phases(self.phases)
        check_methods(self)
        check_schedule(self)
        for key in ("fail_at", "hold_at"):
            check_debug_point(self.phases, f"debug.{key}", getattr(self.debug, key))


def check_debug_point(phases: list[PhaseConfig], key: str, at: FailAt | HoldAt | None) -> None:
    """A debug point (``debug.fail_at``, ``debug.hold_at``) must name a training phase and one of its epochs."""
    if at is None:
        return
    check(at.phase < len(phases) and phases[at.phase].trains, f"{key}.phase",
          f"must be the index of a training phase ({', '.join(TRAINING_PHASES)}), got {at.phase}")
    check(at.epoch <= phases[at.phase].epochs, f"{key}.epoch",
          f"phase {at.phase} runs {phases[at.phase].epochs} epochs, got {at.epoch}")


def check_phases(phases: list[PhaseConfig]) -> None:
    """The phase sequence must make sense: one decompose at most, and fine-tuning only after it."""
    check(len(phases) >= 1, "phases", "needs at least one phase")
    kinds = [p.kind for p in phases]
    for i, kind in enumerate(kinds):
        if kind == "decompose":
            check(kind not in kinds[:i], f"phases.{i}.kind", "decompose may appear only once")
        if kind == "admm":
            check("decompose" not in kinds[:i], f"phases.{i}.kind",
                  "admm trains the dense model toward low rank; put it before the decompose phase")
        if kind == "finetune":
            check("decompose" in kinds[:i] or "rank_prune" in kinds[:i], f"phases.{i}.kind",
                  "finetune trains the factored model; put a decompose or rank_prune phase before it")
        if kind == "rank_prune":
            check(kind not in kinds[:i] and "decompose" not in kinds[:i], f"phases.{i}.kind",
                  "rank_prune factors the dense model itself: once, and not after decompose")
        if kind in ("decompose", "admm"):
            check("rank_prune" not in kinds[:i], f"phases.{i}.kind",
                  f"{kind} needs the dense model; rank_prune before it has factored it already")


def check_methods(cfg: WorkerConfig) -> None:
    """What the decompose and rank_prune sections need from the rest of the config."""
    kinds = [p.kind for p in cfg.phases]
    if "decompose" in kinds and cfg.decompose.fit == "features":
        check(cfg.data.dataset != "synthetic", "decompose.fit",
              "features fits layer outputs on real training images; data.dataset=synthetic has none "
              "(use fit: weights, or a real dataset)")
        fitted = ("svd", "tucker2", "lowrank_sparse")
        check(cfg.compression.format in fitted, "decompose.fit",
              f"features exists for compression.format {', '.join(fitted)}; got {cfg.compression.format!r}")
    if "rank_prune" in kinds:
        phase = cfg.phases[kinds.index("rank_prune")]
        check(cfg.rank_prune.interval <= phase.epochs, "rank_prune.interval",
              f"must be <= the rank_prune phase's epochs ({phase.epochs}), or no prune ever happens; "
              f"got {cfg.rank_prune.interval}")


def check_schedule(cfg: WorkerConfig) -> None:
    """What distillation and the one-curve learning-rate schedule need from the rest of the config."""
    for i, p in enumerate(cfg.phases):
        if p.distill is not None and p.distill.teacher == "init":
            check(cfg.model.init is not None, f"phases.{i}.distill.teacher",
                  "'init' takes the teacher from model.init, which is null; set model.init, or give the teacher "
                  "as a run directory, checkpoint directory, MLflow run id or weights file")
    if cfg.optim.schedule != "one_curve":
        return
    kinds = [p.kind for p in cfg.phases]
    check("rank_prune" not in kinds, "optim.schedule",
          "one_curve is not available with a rank_prune phase (it rebuilds its engine at every prune); "
          "use per_phase")
    training = [i for i, p in enumerate(cfg.phases) if p.trains]
    for i in training[1:]:
        check(cfg.phases[i].lr is None, f"phases.{i}.lr",
              f"with optim.schedule=one_curve the training phases share one curve that starts at the first "
              f"training phase's lr; leave this phase's lr unset (null), got {cfg.phases[i].lr}")
