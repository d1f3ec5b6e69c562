"""Config sections the method owns: what to compress (``compression``) and how ADMM runs (``admm``).

Every section of the experiment config is a dataclass owned by the package that
uses it and validated in ``__post_init__``: a bad value raises ``ValueError``
whose message starts with the field name; the launcher prefixes the section
(``admm.rho: must be > 0``). This module is the bottom of the import graph, so
the shared ``check`` helper lives here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

# The one list of decomposition formats; admm.formats.projections keys its projections by it.
FormatName = Literal["svd", "tucker2", "tt", "cp", "lowrank_sparse"]
FORMATS: tuple[str, ...] = get_args(FormatName)

# How the free layers share the budget (admm.planning.planner.plan_ranks): one keep fraction for every layer, or
# ranks that minimise the summed relative projection error of the trained weights (admm.planning.allocate).
AllocationName = Literal["uniform", "error"]
ALLOCATIONS: tuple[str, ...] = get_args(AllocationName)

# What compression.keep_ratio is a fraction of (admm.planning.planner.BUDGET_COSTS counts each): the conv/linear weights, or
# their FLOPs per image at the dataset's input size (TT-ADMM reports ImageNet results as FLOPs reductions).
# latency: a fraction of the dense model's measured latency (compression.latency; admm.planning.latency_budget).
BudgetName = Literal["params", "flops", "latency"]
BUDGETS: tuple[str, ...] = get_args(BudgetName)

# How the layers of a latency budget are timed: torch eager in the default (NCHW) memory format, or eager with
# input and weights in channels_last (how `tdcompress evaluate` serves on CPU, where oneDNN prefers it).
LatencyRuntime = Literal["eager", "channels_last"]
LATENCY_RUNTIMES: tuple[str, ...] = get_args(LatencyRuntime)


def check(ok: bool, key: str, message: str) -> None:
    """Raise ``ValueError("key: message")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{key}: {message}")


@dataclass
class LatencyTarget:
    """compression.latency: the target of ``compression.budget=latency``.

    The plan keeps ``target`` x the dense model's latency, measured on this device in ``runtime`` at
    ``batch`` images per forward pass; each planned layer is timed at ``points`` candidate ranks.
    """

    target: float = 0.5  # fraction of the dense model's measured latency per batch
    batch: int = 32
    runtime: LatencyRuntime = "eager"
    # Candidate ranks timed per layer (an even grid over the layer's rank ladder): the plan lands within one
    # step of this grid of the target; more points cost proportionally more measuring, once per device.
    points: int = 16

    def __post_init__(self) -> None:
        check(isinstance(self.target, (int, float)) and 0 < self.target <= 1, "target",
              f"must be in (0, 1] (a fraction of the dense model's latency), got {self.target!r}")
        check(isinstance(self.batch, int) and 1 <= self.batch <= 4096, "batch",
              f"must be an integer in 1..4096 (images per timed forward pass), got {self.batch!r}")
        check(self.runtime in LATENCY_RUNTIMES, "runtime", f"must be one of {LATENCY_RUNTIMES}, got {self.runtime!r}")
        check(isinstance(self.points, int) and 2 <= self.points <= 256, "points",
              f"must be an integer in 2..256 (candidate ranks timed per layer), got {self.points!r}")


@dataclass
class CompressionConfig:
    format: FormatName = "tucker2"
    # Fraction of the model's conv/linear parameters (budget=params) or FLOPs per image (budget=flops) to keep;
    # layers in ``ranks`` are fixed, the others share what is left.
    keep_ratio: float = 0.5
    budget: BudgetName = "params"
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
    # uniform: every free layer keeps the same fraction of its parameters (planned from shapes alone; under
    # budget=flops that shared fraction is the largest whose total FLOPs fit).
    # error: ranks from the one budget, minimising sum_l ||W_l - Proj(W_l)||^2 / ||W_l||^2 of the weights the
    # phase starts from (admm.planning.allocate); the driver can only print the uniform plan as an estimate.
    allocation: AllocationName = "uniform"
    # error allocation only: each layer keeps at least this fraction of its full rank (per rank field, >= 1)...
    min_rank_ratio: float = 0.0
    # ...and at most this fraction of its dense parameters (of its dense FLOPs under budget=flops).
    max_keep: float = 1.0
    # budget=latency only (and then required): the latency target, e.g. {target: 0.5, batch: 32, runtime: eager}.
    latency: LatencyTarget | None = None

    def __post_init__(self) -> None:
        check(self.rank_multiple >= 1, "rank_multiple", f"must be >= 1 (1 = no rounding), got {self.rank_multiple}")
        check(self.budget in BUDGETS, "budget",
              f"must be one of {BUDGETS} (what keep_ratio is a fraction of), got {self.budget!r}")
        check(self.budget != "latency" or self.latency is not None, "latency",
              "compression.budget=latency needs compression.latency={target: FRACTION, batch: N, runtime: "
              f"one of {LATENCY_RUNTIMES}}}")
        check(self.budget == "latency" or self.latency is None, "latency",
              f"applies to compression.budget=latency only (budget is {self.budget!r}); set budget=latency or "
              "remove compression.latency")
        check(self.allocation in ALLOCATIONS, "allocation", f"must be one of {ALLOCATIONS}, got {self.allocation!r}")
        check(0 <= self.min_rank_ratio <= 1, "min_rank_ratio", f"must be in [0, 1], got {self.min_rank_ratio}")
        check(0 < self.max_keep <= 1, "max_keep", f"must be in (0, 1], got {self.max_keep}")
        check(self.allocation == "error" or (self.min_rank_ratio == 0 and self.max_keep == 1),
              "min_rank_ratio" if self.min_rank_ratio != 0 else "max_keep",
              "min_rank_ratio and max_keep apply to allocation=error only; set compression.allocation=error "
              "or leave them at 0 and 1")
        check(0 < self.keep_ratio <= 1, "keep_ratio", f"must be in (0, 1], got {self.keep_ratio}")
        check(self.min_channels >= 1, "min_channels", f"must be >= 1, got {self.min_channels}")
        check(0 <= self.sparse_fraction < 1, "sparse_fraction", f"must be in [0, 1), got {self.sparse_fraction}")


@dataclass
class AdmmConfig:
    # TT-ADMM's public code (Yin et al., CVPR 2021) keeps rho fixed at 1e-3 (here: rho_growth 1.0, as in
    # configs/cifar10_resnet32_tt_peer.yaml). Growing rho at every Z-update (capped at rho_max) is this
    # project's choice, from no paper of the four: a larger penalty makes non-convex ADMM settle on the
    # constraint set sooner (varying the penalty: Boyd et al. 2011, section 3.4.1), so short runs end near low rank.
    rho: float = 1e-3  # initial penalty weight
    rho_growth: float = 1.2  # rho *= growth at every Z-update (1.0 = TT-ADMM's fixed rho)
    rho_max: float = 1.0
    interval: int = 1  # Z-update every `interval` units
    unit: Literal["epoch", "step"] = "epoch"
    # Log the error of decomposing W now every N Z-updates (0 = never): it costs one more projection.
    decomp_every: int = 1
    # Iterative projections, warm-started at every Z-update from the layer's previous factors (admm.formats.warm).
    # Defaults: admm.formats.projections.HOOI_SWEEPS / HOOI_TOL / CP_N_ITER / CP_TOL (why: the comments there).
    hooi_sweeps: int = 1  # tucker2: HOOI sweeps per Z-update (the first update adds them to HOSVD)
    hooi_tol: float = 0.0  # stop HOOI after a sweep lowering ||W - Z|| by < hooi_tol * ||W|| (0 = never)
    cp_sweeps: int = 20  # cp: ALS sweeps per Z-update
    cp_tol: float = 0.0  # stop ALS after a sweep lowering ||W - Z|| / ||W|| by < cp_tol (0 = never)

    def __post_init__(self) -> None:
        check(self.rho > 0, "rho", f"must be > 0, got {self.rho}")
        check(isinstance(self.hooi_sweeps, int) and 1 <= self.hooi_sweeps <= 1000, "hooi_sweeps",
              f"must be an integer in 1..1000 (warm HOOI needs at least one sweep), got {self.hooi_sweeps!r}")
        check(0 <= self.hooi_tol < 1, "hooi_tol", f"must be in [0, 1) (0 = run every sweep), got {self.hooi_tol}")
        check(isinstance(self.cp_sweeps, int) and 1 <= self.cp_sweeps <= 10000, "cp_sweeps",
              f"must be an integer in 1..10000, got {self.cp_sweeps!r}")
        check(0 <= self.cp_tol < 1, "cp_tol", f"must be in [0, 1) (0 = run every sweep), got {self.cp_tol}")
        check(self.decomp_every >= 0, "decomp_every", f"must be >= 0 (0 = never), got {self.decomp_every}")
        check(self.rho_growth >= 1, "rho_growth", f"must be >= 1, got {self.rho_growth}")
        check(self.rho_max >= self.rho, "rho_max", f"must be >= rho ({self.rho}), got {self.rho_max}")
        check(self.interval >= 1, "interval", f"must be >= 1, got {self.interval}")
