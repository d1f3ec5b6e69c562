"""ADMM state of the layers one rank owns, and the Z/U update (no process coordination here).

Scaled-form ADMM (Boyd et al. 2011, section 3.1.1) for  min L(W) s.t. W_l in C_l:
    W <- SGD on L(W) + sum_l rho/2 ||W_l - Z_l + U_l||^2
    Z_l <- Proj_{C_l}(W_l + U_l)
    U_l <- U_l + W_l - Z_l
When rho changes, the scaled dual U = Y / rho is rescaled by rho_old / rho_new
(Boyd section 3.4.1) so the unscaled multiplier Y is unchanged.

tucker2 and cp projections are iterative (HOOI, ALS): each layer also keeps the
factors its last projection ended with (``warm``, :mod:`admm.formats.warm`) and its next
Z-update starts from them. They are part of the state (and of checkpoints), so a
resumed run projects exactly as the uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from admm.formats.projections import RankSpec
from admm.formats.warm import ProjectionOptions, Warm, project_warm


@dataclass
class LayerState:
    """Z and U of one owned layer, shaped like its weight, fp32, on the weight's device."""

    fmt: str
    rank: RankSpec
    z: Tensor
    u: Tensor
    warm: Warm = field(default_factory=dict)  # factors of the last projection (tucker2, cp), to start the next
    v: Tensor = field(init=False)  # U - Z, cached: the penalty gradient is rho (W + V)

    def __post_init__(self) -> None:
        self.v = self.u - self.z


@dataclass
class UpdateStats:
    """Squared norms of one layer at a Z-update (sums of squares, so they add across layers)."""

    w_sq: float  # ||W||^2
    primal_sq: float  # ||W - Z||^2
    dual_sq: float  # ||Z - Z_prev||^2 (times rho^2 gives the dual residual)
    decomp_sq: float  # ||W - Proj(W)||^2: error if the model were decomposed now (-1: not computed)


@dataclass
class AdmmState:
    rho: float
    updates: int = 0
    layers: dict[str, LayerState] = field(default_factory=dict)
    options: ProjectionOptions = field(default_factory=ProjectionOptions)  # HOOI / ALS sweeps

    def init_layer(self, name: str, weight: Tensor, fmt: str, rank: RankSpec) -> None:
        """Z = Proj(W) (cold: HOSVD / svd init), U = 0: the first penalty pulls W toward its projection."""
        w = weight.detach().float()
        z, warm = project_warm(w, fmt, rank, None, self.options)
        self.layers[name] = LayerState(fmt, rank, z, torch.zeros_like(w), warm)

    @torch.no_grad()
    def update_layer(self, name: str, weight: Tensor, decomp_error: bool) -> UpdateStats:
        """Z = Proj(W + U) warm-started from the layer's last factors; U += W - Z. Returns its residual norms.

        The decomposition error Proj(W) starts from the new factors too (W + U is near W)
        and leaves the warm state alone, so logging it never changes the iterates.
        """
        s = self.layers[name]
        w = weight.detach().float()
        z_prev = s.z
        s.z, s.warm = project_warm(w + s.u, s.fmt, s.rank, s.warm, self.options)
        s.u = s.u + w - s.z
        s.v = s.u - s.z
        decomp = -1.0
        if decomp_error:
            decomp = float((w - project_warm(w, s.fmt, s.rank, s.warm, self.options)[0]).square().sum())
        return UpdateStats(w_sq=float(w.square().sum()), primal_sq=float((w - s.z).square().sum()),
                           dual_sq=float((s.z - z_prev).square().sum()), decomp_sq=decomp)

    def set_rho(self, rho: float) -> None:
        """Change rho and rescale the scaled duals so the multipliers Y = rho U stay put."""
        if rho == self.rho:
            return
        scale = self.rho / rho
        for s in self.layers.values():
            s.u = s.u * scale
            s.v = s.u - s.z
        self.rho = rho

    def state_dict(self) -> dict[str, Any]:
        return {"rho": self.rho, "updates": self.updates,
                "layers": {n: {"z": s.z, "u": s.u, "warm": dict(s.warm)} for n, s in self.layers.items()}}
