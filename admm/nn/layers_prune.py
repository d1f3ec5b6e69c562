"""Rank pruning (Sharma et al., IEEE Access 2025): a layer held as ``U diag(s) V^T``, its rank cut while it trains.

:class:`PrunableSVDLayer` is the svd format (kxk conv ``C_in -> r``, then 1x1
``r -> C_out``) with the singular values ``s`` as their own parameter, so an
L1 penalty on ``s`` drives unneeded directions to zero and an orthogonality
penalty keeps ``U``, ``V`` near-orthonormal (the magnitude of a direction then
lives in ``s`` alone, which makes ``|s_i|`` a fair pruning score). Parameters:

    u (C_out, r)    s (r,)    v (r, C_in*kh*kw)    bias (C_out,) iff the dense layer had one

Its spec is svd's plus ``"parametrization": "usv"``, so a checkpoint taken
mid-phase rebuilds it (:func:`admm.nn.surgery.module_from_spec`) at the pruned
rank. :meth:`PrunableSVDLayer.to_svd` gives the plain :class:`SVDLayer` the
decompose phase would build, for fine-tuning and export.

Pure torch; the penalties are gradients to add (:func:`penalty_grads`), not loss terms.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from admm.formats.reshape import to_matrix
from admm.nn.layers import SVDLayer
from admm.nn.layers_base import FactoredLayer, Geometry, assign

__all__ = ["FACTOR_DIM", "PARAMETRIZATION", "PrunableSVDLayer", "fixed_signs", "penalty_grads", "plan_prune",
           "svd_params"]

PARAMETRIZATION = "usv"
FACTOR_DIM = {"u": 1, "s": 0, "v": 0}  # the rank dimension of each factor: what keep() slices


def svd_params(shape: Sequence[int], rank: int) -> int:
    """Parameters of the svd factor pair at ``rank`` (bias excluded): ``r * (C_out + C_in*kh*kw)``."""
    return rank * (int(shape[0]) + math.prod(int(d) for d in shape[1:]))


def fixed_signs(u: Tensor, s: Tensor, vh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """An SVD ``(u (m, k), s (k,), vh (k, n))`` with each left singular vector's largest-magnitude entry positive.

    LAPACK returns each pair ``(u_i, vh_i)`` up to a common sign, and which sign can flip under
    float noise of the input: weights trained on 1 or on 2 workers differ in their last bits, and
    noise of 1e-7 flipped a pair in 17 of 200 random 16x72 matrices. The factors are trained and
    checkpointed as they are, so the same weights must give the same factors: ``u_i, vh_i ->
    -u_i, -vh_i`` keeps the product and leaves the sign to which entry of ``u_i`` is largest.
    """
    cols = torch.arange(u.shape[1], device=u.device)
    sign = torch.sign(u[u.abs().argmax(dim=0), cols])
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, s, vh * sign[:, None]


class PrunableSVDLayer(FactoredLayer):
    """``y = conv_1x1(conv_kxk(x, diag(s) V), U) + b``; see the module docstring for shapes."""

    format = "svd"

    def _build(self, factory: dict[str, Any]) -> None:
        g, r = self.geometry, int(self.rank)  # type: ignore[arg-type]
        n = math.prod(g.weight_shape[1:])
        self.u = nn.Parameter(torch.zeros(g.out_channels, r, **factory))
        self.s = nn.Parameter(torch.zeros(r, **factory))
        self.v = nn.Parameter(torch.zeros(r, n, **factory))

    def _init_factors(self, weight: Tensor) -> None:
        r = int(self.rank)  # type: ignore[arg-type]
        u, s, vh = fixed_signs(*torch.linalg.svd(to_matrix(weight), full_matrices=False))
        assign(self.u, u[:, :r])
        assign(self.s, s[:r])
        assign(self.v, vh[:r])

    def init_random(self, generator: torch.Generator | None = None) -> None:
        """Random orthonormal ``U``, ``V`` and a flat spectrum with the scale of Kaiming-normal init (training from scratch)."""
        g, r = self.geometry, int(self.rank)  # type: ignore[arg-type]
        n = self.v.shape[1]
        with torch.no_grad():
            u = torch.linalg.qr(torch.randn(g.out_channels, r, generator=generator, dtype=torch.float64))[0]
            v = torch.linalg.qr(torch.randn(n, r, generator=generator, dtype=torch.float64))[0]
            # A Kaiming-normal (fan_in = n) matrix has Frobenius norm^2 ~ C_out * 2: spread it over r values.
            assign(self.u, u)
            assign(self.v, v.t())
            self.s.fill_(math.sqrt(2.0 * g.out_channels / r))

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "parametrization": PARAMETRIZATION}

    def _spatial(self) -> Tensor:
        first = self.s[:, None] * self.v
        return first.reshape(-1, *self.geometry.weight_shape[1:])

    def forward(self, x: Tensor) -> Tensor:
        g = self.geometry
        if g.kind == "conv":
            y = F.conv2d(x, self._spatial(), None, **g.conv_kwargs)
            return F.conv2d(y, self.u[:, :, None, None], self.bias)
        return F.linear(F.linear(x, self._spatial()), self.u, self.bias)

    def to_dense_weight(self) -> Tensor:
        return ((self.u * self.s) @ self.v).reshape(self.geometry.weight_shape)

    @torch.no_grad()
    def keep(self, index: Tensor) -> None:
        """Keep only the directions ``index`` (1-D, int64, distinct): new, smaller parameters replace the old.

        The optimizer that held the old parameters must be rebuilt; state tied to a factor
        (e.g. its momentum) follows with ``state.index_select(FACTOR_DIM[name], index)``.
        """
        index = index.to(self.s.device)
        if index.numel() < 1:
            raise ValueError("a layer must keep at least one direction")
        for name, dim in FACTOR_DIM.items():
            old = getattr(self, name)
            new = old.index_select(dim, index).clone()
            setattr(self, name, nn.Parameter(new, requires_grad=old.requires_grad))
        self.rank = int(index.numel())

    @torch.no_grad()
    def to_svd(self) -> SVDLayer:
        """The equivalent plain svd layer (same function): ``sqrt|s|`` split into both factors, sign kept in the first."""
        g = self.geometry
        out = SVDLayer(g, int(self.rank), device=self.s.device, dtype=self.s.dtype)  # type: ignore[arg-type]
        root = self.s.abs().sqrt()
        assign(out.factors[0], (torch.sign(self.s) * root)[:, None] * self.v)
        assign(out.factors[1], self.u * root)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        out.train(self.training)
        return out

    @classmethod
    def from_geometry(cls, module: nn.Conv2d | nn.Linear, rank: int) -> "PrunableSVDLayer":
        """An uninitialised (zero) layer of ``module``'s geometry at ``rank``, bias copied."""
        layer = cls(Geometry.of(module), rank, device=module.weight.device, dtype=module.weight.dtype)
        if module.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(module.bias)
        return layer


@torch.no_grad()
def penalty_grads(layer: PrunableSVDLayer, l1: float, orth: float,
                  which: Sequence[str] = ("u", "s", "v")) -> dict[str, Tensor]:
    """Gradients of ``l1 * sum|s| / max|s| + orth * (||U^T U - I||^2 + ||V V^T - I||^2)`` for ``u``, ``s``, ``v``.

    The L1 term is taken relative to the layer's largest value (held constant), so
    one ``l1`` fits layers of every scale: each step moves every ``s_i`` toward
    zero by ``lr * l1 * max|s|`` against what the data asks for.
    """
    u, s, v = layer.u, layer.s, layer.v
    eye = torch.eye(s.numel(), dtype=u.dtype, device=u.device)
    out = {}
    if "u" in which:
        out["u"] = (4 * orth) * (u @ (u.t() @ u - eye))
    if "s" in which:
        out["s"] = (l1 / s.abs().max().clamp_min(torch.finfo(s.dtype).tiny)) * torch.sign(s)
    if "v" in which:
        out["v"] = (4 * orth) * ((v @ v.t() - eye) @ v)
    return out


def plan_prune(values: Mapping[str, Tensor], shapes: Mapping[str, Sequence[int]], *, threshold: float,
               min_rank: int, allowed: float | None = None) -> dict[str, Tensor]:
    """Which directions each layer keeps: ``{layer: sorted kept indices (int64)}``.

    A direction goes when ``|s_i| < threshold * max|s|`` of its layer; each layer
    keeps at least ``min(min_rank, rank)`` (its largest). When ``allowed`` (a
    parameter count of the svd form, :func:`svd_params`) is given and the kept
    ranks exceed it, the globally weakest directions (smallest ``|s_i| / max|s|``)
    go as well until it is met or every layer is at its minimum.
    """
    keep: dict[str, Tensor] = {}
    extra: list[tuple[float, str, int]] = []  # (relative value, layer, index) of removable kept directions
    total = 0
    per_rank: dict[str, int] = {}
    for name, s in values.items():
        mag = s.detach().abs().double().cpu()
        rel = mag / mag.max().clamp_min(1e-300)
        order = torch.argsort(rel, descending=True)
        protected = set(order[:min(min_rank, mag.numel())].tolist())
        kept = sorted(i for i in range(mag.numel()) if rel[i] >= threshold or i in protected)
        keep[name] = torch.tensor(kept, dtype=torch.long)
        per_rank[name] = svd_params(shapes[name], 1)
        total += len(kept) * per_rank[name]
        extra += [(float(rel[i]), name, i) for i in kept if i not in protected]
    if allowed is not None and total > allowed:
        drop: dict[str, set[int]] = {}
        for _rel, name, i in sorted(extra):
            if total <= allowed:
                break
            drop.setdefault(name, set()).add(i)
            total -= per_rank[name]
        for name, gone in drop.items():
            keep[name] = torch.tensor([i for i in keep[name].tolist() if i not in gone], dtype=torch.long)
    return keep
