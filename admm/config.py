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

# The one list of decomposition formats; admm.projections keys its projections by it.
FormatName = Literal["svd", "tucker2", "tt", "cp", "lowrank_sparse"]
FORMATS: tuple[str, ...] = get_args(FormatName)


def check(ok: bool, key: str, message: str) -> None:
    """Raise ``ValueError("key: message")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{key}: {message}")


@dataclass
class CompressionConfig:
    format: FormatName = "tucker2"
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
