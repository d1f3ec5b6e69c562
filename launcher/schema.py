"""Typed, validated experiment configuration.

Each section is a dataclass whose ``__post_init__`` checks ranges; the
generic builder in :mod:`launcher.config` checks unknown keys and types, so a
bad experiment file fails on the driver, before Ray or any worker starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

MODELS = ("resnet20", "resnet32", "resnet56", "resnet18", "resnet50", "tinycnn")
DATASETS = ("packed", "cifar10", "cifar100", "imagenet", "synthetic")
PHASE_KINDS = ("pretrain", "admm", "decompose", "finetune", "evaluate")
FORMATS = ("svd", "tucker2", "tt", "cp", "lowrank_sparse")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and what is allowed."""


def check(ok: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    name: Literal["resnet20", "resnet32", "resnet56", "resnet18", "resnet50", "tinycnn"] = "resnet20"


@dataclass
class DataConfig:
    dataset: Literal["packed", "cifar10", "cifar100", "imagenet", "synthetic"] = "packed"
    # Directory of the dataset; empty means the TDC_DATA_ROOT environment variable.
    root: str | None = None
    download: bool = False
    batch_size: int = 128  # global images per optimizer step, all workers together
    eval_batch_size: int = 256
    train_subset: int = 0  # 0 = the whole split; else a fixed seeded random subset
    eval_subset: int = 0
    augment: bool = True
    loader_workers: int = 0  # DataLoader processes per training worker
    synthetic_train: int = 1024
    synthetic_eval: int = 256

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        for key in ("train_subset", "eval_subset", "loader_workers"):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("synthetic_train", "synthetic_eval"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")


@dataclass
class OptimConfig:
    lr: float = 0.1  # peak learning rate for the global batch
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # applied to conv/linear weights, not to BN or biases
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    label_smoothing: float = 0.0
    grad_accum: int = 1  # micro-batches per optimizer step
    # Global gradient-norm clipping; 0 = off. DeepSpeed 0.19 clips at 1.0 unless told otherwise,
    # which silently shrank the ADMM penalty gradient; the project always sets it explicitly.
    grad_clip: float = 0.0
    # torch's fused SGD: the whole update in one kernel per step (CPU and CUDA). On CPU it took
    # ResNet-50's SGD step from 14.5 to 8.0 ms (bench/README.md, train_throughput.py --fused).
    fused: bool = True

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        check(not self.nesterov or self.momentum > 0, "nesterov", "needs momentum > 0")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(0 <= self.label_smoothing < 1, "label_smoothing",
              f"must be in [0, 1), got {self.label_smoothing}")
        check(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        check(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")


@dataclass
class EngineConfig:
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1 or 2
    # auto: bf16 autocast on a GPU, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # auto: channels_last inputs on a GPU (parameters stay contiguous for DeepSpeed).
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False  # torch.compile the model inside the engine

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2), "zero_stage", f"must be one of 0, 1, 2, got {self.zero_stage}")


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
    object_store_mb: int = 512  # embedded Ray only

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        check(self.cpus_per_worker >= 1, "cpus_per_worker", f"must be >= 1, got {self.cpus_per_worker}")
        check(self.max_failures >= -1, "max_failures", f"must be >= -1 (-1 = retry forever), got {self.max_failures}")
        check(self.object_store_mb >= 64, "object_store_mb", f"must be >= 64, got {self.object_store_mb}")
        check(self.backend == "ray" or self.num_workers == 1, "num_workers",
              f"backend 'local' runs exactly one worker, got {self.num_workers}")


@dataclass
class TrackingConfig:
    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns.db
    uri: str | None = None
    experiment: str = "tdcompress"


@dataclass
class CompressionConfig:
    format: Literal["svd", "tucker2", "tt", "cp", "lowrank_sparse"] = "tucker2"
    # Fraction of each planned layer's parameters to keep (ignored for layers in ``ranks``).
    keep_ratio: float = 0.5
    # Explicit per-layer ranks by module name: int, or a list for tucker2 / lowrank_sparse.
    ranks: dict[str, int | list[int]] = field(default_factory=dict)
    include: list[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns on module names
    exclude: list[str] = field(default_factory=lambda: ["conv1", "fc", "linear", "*downsample*", "*shortcut*"])
    min_channels: int = 8  # layers with fewer in- or out-channels stay dense
    sparse_fraction: float = 0.01  # lowrank_sparse: kept residual entries per layer
    # Round planned ranks >= this to the nearest multiple of it (1 = exact ranks). Kernels run
    # faster on channel counts the vector units and tensor cores tile evenly: 16 fp32 lanes of
    # AVX-512, 8/16-wide bf16 MMA tiles. Explicit `ranks` are never rounded.
    rank_multiple: int = 1

    def __post_init__(self) -> None:
        check(self.rank_multiple >= 1, "rank_multiple", f"must be >= 1 (1 = no rounding), got {self.rank_multiple}")
        check(0 < self.keep_ratio <= 1, "keep_ratio", f"must be in (0, 1], got {self.keep_ratio}")
        check(self.min_channels >= 1, "min_channels", f"must be >= 1, got {self.min_channels}")
        check(0 <= self.sparse_fraction < 1, "sparse_fraction", f"must be in [0, 1), got {self.sparse_fraction}")


@dataclass
class AdmmConfig:
    rho: float = 1e-3  # initial penalty weight
    rho_growth: float = 1.2  # rho *= growth at every Z-update
    rho_max: float = 1.0
    interval: int = 1  # Z-update every `interval` units
    unit: Literal["epoch", "step"] = "epoch"
    # Log the error of decomposing W now every N Z-updates (0 = never): it costs one more projection.
    decomp_every: int = 1

    def __post_init__(self) -> None:
        check(self.rho > 0, "rho", f"must be > 0, got {self.rho}")
        check(self.decomp_every >= 0, "decomp_every", f"must be >= 0 (0 = never), got {self.decomp_every}")
        check(self.rho_growth >= 1, "rho_growth", f"must be >= 1, got {self.rho_growth}")
        check(self.rho_max >= self.rho, "rho_max", f"must be >= rho ({self.rho}), got {self.rho_max}")
        check(self.interval >= 1, "interval", f"must be >= 1, got {self.interval}")


@dataclass
class PhaseConfig:
    kind: Literal["pretrain", "admm", "decompose", "finetune", "evaluate"]
    epochs: int = 1
    lr: float | None = None  # overrides optim.lr for this phase
    steps_per_epoch: int = 0  # 0 = a full pass over the data; >0 caps it (smoke runs)

    def __post_init__(self) -> None:
        check(self.epochs >= 0, "epochs", f"must be >= 0, got {self.epochs}")
        check(self.lr is None or self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.steps_per_epoch >= 0, "steps_per_epoch", f"must be >= 0, got {self.steps_per_epoch}")

    @property
    def trains(self) -> bool:
        return self.kind in ("pretrain", "admm", "finetune")


@dataclass
class Config:
    name: str
    seed: int = 0
    resume: bool = False
    run_name: str | None = None  # default: <name>-<timestamp>; resume picks the latest
    log_every: int = 50  # optimizer steps between progress lines / metric logs
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    admm: AdmmConfig = field(default_factory=AdmmConfig)
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig("pretrain"), PhaseConfig("evaluate")])

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, "name", f"must be a non-empty name without '/', got {self.name!r}")
        check(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        check(len(self.phases) >= 1, "phases", "needs at least one phase")
        kinds = [p.kind for p in self.phases]
        for i, kind in enumerate(kinds):
            if kind in ("decompose",):
                check(kind not in kinds[:i], f"phases.{i}.kind", "decompose may appear only once")
            if kind == "finetune":
                check("decompose" in kinds[:i], f"phases.{i}.kind",
                      "finetune trains the factored model; put a decompose phase before it")
        split = self.optim.grad_accum * self.cluster.num_workers
        check(self.data.batch_size % split == 0, "data.batch_size",
              f"must be divisible by optim.grad_accum x cluster.num_workers ({split}), got {self.data.batch_size}")
