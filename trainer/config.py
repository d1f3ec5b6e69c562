"""Config sections the trainer owns, and the typed config a worker runs.

Sections: ``model``, ``data``, ``optim``, ``engine``, ``phases``, ``tracking``,
``debug``. Each is validated in ``__post_init__`` (``ValueError`` naming the
field; the launcher adds the section). :class:`trainer.worker_config.WorkerConfig`
gathers them with the method's sections and checks them against each other.

The name lists (models, datasets, phase kinds) are the ``Literal`` types here;
the registries in :mod:`trainer.models`, :mod:`trainer.data` and
:mod:`trainer.phases` are keyed by them (tests/test_layout.py checks they agree).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

from admm.config import check

ModelName = Literal["resnet20", "resnet32", "resnet56", "resnet18", "resnet50", "tinycnn"]
DatasetName = Literal["packed", "cifar10", "cifar100", "imagenet", "synthetic", "shards"]
DecodeWhere = Literal["cpu", "gpu"]
DECODE_WHERE: tuple[str, ...] = get_args(DecodeWhere)
PhaseKind = Literal["pretrain", "admm", "decompose", "finetune", "evaluate", "rank_prune"]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)
DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)
PHASE_KINDS: tuple[str, ...] = get_args(PhaseKind)
TRAINING_PHASES: tuple[str, ...] = ("pretrain", "admm", "finetune", "rank_prune")  # phases that run epochs of SGD
COMPRESSING_PHASES: tuple[str, ...] = ("admm", "decompose")  # phases that need a rank plan
DISTILL_PHASES: tuple[str, ...] = ("pretrain", "admm", "finetune")  # phases whose loss a teacher can join
LrSchedule = Literal["per_phase", "one_curve"]
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)
DEVICE_CACHE_DATASETS: tuple[str, ...] = ("packed", "cifar10", "cifar100")  # data.device_cache: CIFAR-style only


@dataclass
class ModelConfig:
    name: ModelName = "resnet20"
    # Initial weights (trainer/init_weights.py): a run directory (its newest intact checkpoint, dense),
    # a checkpoint directory, an MLflow run id, or a state_dict file (.pth/.pt/.safetensors). Applied
    # once at the start of the first phase, never on resume (the run's own checkpoint wins).
    init: str | None = None

    def __post_init__(self) -> None:
        check(self.init is None or bool(self.init.strip()), "init",
              "must be null or a run directory, checkpoint directory, MLflow run id or weights file, got ''")


@dataclass
class DataConfig:
    dataset: DatasetName = "packed"
    # Directory of the dataset; empty means the TDC_DATA_ROOT environment variable.
    root: str | None = None
    download: bool = False
    batch_size: int = 128  # global images per optimizer step, all workers together
    eval_batch_size: int = 256
    train_subset: int = 0  # 0 = the whole split; else a fixed seeded random subset
    eval_subset: int = 0
    augment: bool = True
    loader_workers: int = 0  # DataLoader processes per training worker
    # An undecodable image: false = stop with an error naming it; true = skip it (warned and counted).
    skip_bad_images: bool = False
    synthetic_train: int = 1024
    synthetic_eval: int = 256
    # dataset "shards" (tar shards from `tdcompress pack`): where JPEGs are decoded (gpu: nvJPEG on the
    # training device, batched; cpu: the loader processes) and the per-worker shuffle buffer in samples.
    decode: DecodeWhere = "cpu"
    shuffle_buffer: int = 2048
    # Small CIFAR-style datasets: decode each split once, keep it as uint8 on the training device and
    # crop/flip/normalise there in batch (trainer/data/device_cache.py); for GPUs, also works on the CPU.
    device_cache: bool = False

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        for key in ("train_subset", "eval_subset", "loader_workers"):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("synthetic_train", "synthetic_eval", "shuffle_buffer"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.decode in DECODE_WHERE, "decode", f"must be one of {', '.join(DECODE_WHERE)}, got {self.decode!r}")
        check(self.decode == "cpu" or self.dataset == "shards", "decode",
              f"'gpu' decodes the tar shards of dataset 'shards' only; got dataset {self.dataset!r}")
        check(not self.device_cache or self.dataset in DEVICE_CACHE_DATASETS, "device_cache",
              f"holds CIFAR-style datasets only ({', '.join(DEVICE_CACHE_DATASETS)}); got dataset {self.dataset!r}")


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
    # per_phase: every training phase runs its own warmup + cosine from its lr (phases.N.lr or lr).
    # one_curve: the training phases share ONE warmup + cosine, from the first training phase's lr down
    # to min_lr_ratio at the end of the last one; a later phase continues where the one before left off
    # (trainer/core/lr_curve.py), so ADMM and fine-tuning run as one schedule.
    schedule: LrSchedule = "per_phase"

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
class TrackingConfig:
    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns.db
    uri: str | None = None
    experiment: str = "tdcompress"
    # MLflow's own system metrics (CPU, memory; GPU with pynvml) on the parent run, sampled every 10 s.
    system_metrics: bool = True
    # A finished run exports its model (safetensors + manifest) and logs it as the parent's `model/` artifact.
    log_model: bool = True
    # Also register that model in the MLflow model registry under this name (a new version per run).
    register_as: str | None = None
    # Extra tags on the parent run, e.g. {tdcompress.sweep: NAME} (set by `tdcompress sweep`, filtered on by compare).
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(bool(self.experiment.strip()), "experiment", "must be a non-empty MLflow experiment name")
        bad = [k for k in self.tags if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,249}", k)
               or k.startswith("mlflow.")]
        check(not bad, "tags", f"keys must be tag names (letters, digits, '_', '.', '-'; not mlflow.*), got {bad}")
        check(self.register_as is None or bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}", self.register_as)),
              "register_as", f"must be null or a model name (letters, digits, '_', '.', '-'), got {self.register_as!r}")


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen dense teacher during a training phase (trainer/core/distill.py).

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)),
    the T^2 keeping the soft term's gradient scale independent of T (Hinton et al. 2015).
    """

    alpha: float = 0.5  # weight of the soft (teacher) term; 1 - alpha goes to the label loss
    temperature: float = 4.0  # T softening both logit sets
    # "init": the weights model.init names (its run, checkpoint or file); else a run directory, a checkpoint
    # directory, an MLflow run id or a weights file, resolved like model.init on the driver.
    teacher: str = "init"
    model: ModelName | None = None  # the teacher's architecture; null = model.name

    def __post_init__(self) -> None:
        check(0 < self.alpha <= 1, "alpha", f"must be in (0, 1] (the soft term's weight), got {self.alpha}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(bool(self.teacher.strip()), "teacher",
              "must be 'init' (model.init's weights), a run directory, checkpoint directory, MLflow run id "
              "or weights file, got ''")


@dataclass
class PhaseConfig:
    kind: PhaseKind
    epochs: int = 1
    lr: float | None = None  # overrides optim.lr for this phase
    steps_per_epoch: int = 0  # 0 = a full pass over the data; >0 caps it (smoke runs)
    distill: DistillConfig | None = None  # null: the label loss alone

    def __post_init__(self) -> None:
        check(self.epochs >= 0, "epochs", f"must be >= 0, got {self.epochs}")
        check(self.lr is None or self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.steps_per_epoch >= 0, "steps_per_epoch", f"must be >= 0, got {self.steps_per_epoch}")
        check(self.distill is None or self.kind in DISTILL_PHASES, "distill",
              f"is a setting of the phases {', '.join(DISTILL_PHASES)}; got it on kind {self.kind!r}")

    @property
    def trains(self) -> bool:
        return self.kind in TRAINING_PHASES


@dataclass
class DecomposeConfig:
    """How the decompose phase fits the factors (``decompose`` section; admm/feature_fit.py)."""

    # weights: factor each weight alone; features: fit each layer's outputs on real training images,
    # layer by layer through the partly decomposed model (svd, tucker2, lowrank_sparse; Yu et al. 2017).
    fit: Literal["weights", "features"] = "weights"
    calibration_batches: int = 4  # features: global batches of data.batch_size training images

    def __post_init__(self) -> None:
        check(self.calibration_batches >= 1, "calibration_batches", f"must be >= 1, got {self.calibration_batches}")


@dataclass
class RankPruneConfig:
    """The rank_prune phase (Sharma et al. 2025; trainer/phases/rank_prune.py): layers as U diag(s) V^T, ranks pruned."""

    init: Literal["trained", "random"] = "trained"  # factors from the trained weights, or random orthonormal
    l1: float = 1e-4  # weight of the L1 penalty sum |s| (per layer, on s relative to its largest value)
    orth: float = 1e-3  # weight of ||U^T U - I||^2 + ||V V^T - I||^2
    threshold: float = 0.05  # prune s_i with |s_i| < threshold * max|s| of its layer
    interval: int = 1  # epochs between prunes
    min_rank: int = 1  # no layer goes below this rank
    # Fraction of the planned layers' dense parameters the factored layers may keep at the end of the
    # phase (0 = no budget): each prune is held to a linear path toward it and prunes harder when behind.
    keep_ratio: float = 0.0

    def __post_init__(self) -> None:
        check(0 <= self.l1 < 1, "l1", f"must be in [0, 1), got {self.l1}")
        check(0 <= self.orth < 1, "orth", f"must be in [0, 1), got {self.orth}")
        check(0 <= self.threshold < 1, "threshold",
              f"must be in [0, 1) (a fraction of each layer's largest singular value), got {self.threshold}")
        check(self.interval >= 1, "interval", f"must be >= 1 (epochs), got {self.interval}")
        check(self.min_rank >= 1, "min_rank", f"must be >= 1, got {self.min_rank}")
        check(0 <= self.keep_ratio <= 1, "keep_ratio", f"must be in [0, 1] (0 = no budget), got {self.keep_ratio}")


@dataclass
class FailAt:
    """Where an injected failure strikes: after the checkpoint of ``epoch`` (1-based) of phase ``phase``."""

    phase: int
    epoch: int
    rank: int | None = None  # None: every rank fails together

    def __post_init__(self) -> None:
        check(self.phase >= 0, "phase", f"must be >= 0, got {self.phase}")
        check(self.epoch >= 1, "epoch", f"must be >= 1 (epochs count from 1), got {self.epoch}")
        check(self.rank is None or self.rank >= 0, "rank", f"must be >= 0 or null (every rank), got {self.rank}")


@dataclass
class HoldAt:
    """Where a run waits, once, for a test: after the checkpoint of ``epoch`` (1-based) of phase ``phase``.

    Rank 0 writes ``<run dir>/held-<phase>-<epoch>`` when every rank waits; they go on when a file
    ``release-<phase>-<epoch>`` appears there, and fail after ``timeout_s`` seconds without one.
    """

    phase: int
    epoch: int
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        check(self.phase >= 0, "phase", f"must be >= 0, got {self.phase}")
        check(self.epoch >= 1, "epoch", f"must be >= 1 (epochs count from 1), got {self.epoch}")
        check(0 < self.timeout_s <= 3600, "timeout_s", f"must be in (0, 3600] seconds, got {self.timeout_s}")


@dataclass
class DebugConfig:
    # Fail once at this point, to test recovery (cluster.max_failures, resume=true). Logged with
    # the run's params like every other setting; null (the default) never fails.
    fail_at: FailAt | None = None
    # Wait once at this point until the test says go: a fault test acts while the run is in a known
    # state (a checkpoint that is not the phase's last, training under way) instead of racing it.
    hold_at: HoldAt | None = None
