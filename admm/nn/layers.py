"""Factored layers, one per format of :mod:`admm.formats.projections`, and the dispatch by format / spec.

Each layer matches, parameter for parameter, the module :mod:`admm.planning.accounting`
documents (bias excluded there, kept here). For a kernel ``(C_out, C_in, kh, kw)``
(Linear: ``(out, in)`` with ``kh = kw = 1``), parameters in the order they apply:

==============  ==========================================================  =======================
format          factors (``factors.0``, ``factors.1``, ...)                 init
==============  ==========================================================  =======================
svd             ``(r, C_in, kh, kw)`` kxk conv, ``(C_out, r, 1, 1)`` 1x1    truncated SVD, sqrt(S)
                                                                            split into both
tucker2         ``(r_in, C_in, 1, 1)``, ``(r_out, r_in, kh, kw)``,          HOOI (= project_tucker2)
                ``(C_out, r_out, 1, 1)`` (Kim et al. 2016)
cp              ``(R, C_in, 1, 1)``, depthwise ``(R, 1, kh, kw)``,          ALS (= project_cp),
                ``(C_out, R, 1, 1)`` (Lebedev et al. 2015)                  norms balanced
lowrank_sparse  the svd pair of L, plus ``sparse_values (k,)`` (parameter)  lowrank_sparse_parts
                at ``sparse_index (k,)`` (int64 buffer, flat indices into
                the dense kernel) (Yu et al. 2017)
tt              ``cores.j`` (see :mod:`admm.nn.layers_tt`)                     TT-SVD (= project_tt)
==============  ==========================================================  =======================

Linear layers hold the same factors without the trailing ``1, 1``; cp's
depthwise factor becomes a per-component scale ``(R,)``. Only the factor that
carries the kxk kernel gets the dense conv's stride/padding/dilation. Every
layer has ``bias`` ``(C_out,)`` iff the dense one had it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from admm.formats.projections import RankSpec, cp_factors, lowrank_sparse_parts, max_rank, tucker2_factors
from admm.formats.reshape import to_3way, to_matrix
from admm.nn.layers_base import FactoredLayer, Geometry, Padding, assign
from admm.nn.layers_tt import TTLayer
from admm.nn.sparse_conv import SparseColumns, conv_padding, gather_index, sparse_columns, sparse_conv2d

__all__ = [
    "CPLayer",
    "FACTORED_LAYERS",
    "FactoredLayer",
    "Geometry",
    "LowRankSparseLayer",
    "Padding",
    "SPARSE_FORMS",
    "SVDLayer",
    "TTLayer",
    "Tucker2Layer",
    "factorize_module",
]


# How LowRankSparseLayer applies its sparse kernel (see its docstring).
SPARSE_FORMS = ("dense", "gather")


def _zeros(shape: tuple[int, ...], factory: dict[str, Any]) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, **factory))


class SVDLayer(FactoredLayer):
    """svd (rank r): kxk conv ``C_in -> r`` (dense stride/padding/dilation), then 1x1 ``r -> C_out`` (+bias).

    Linear: ``Linear(in, r, bias=False) -> Linear(r, out)``. Conv input
    ``(N, C_in, H, W)`` -> ``(N, C_out, H_out, W_out)``; Linear ``(*, in)`` -> ``(*, out)``.
    """

    format = "svd"

    @property
    def low_rank(self) -> int:
        """Rank of the two-factor product (r)."""
        return self.rank  # type: ignore[return-value]

    def _build(self, factory: dict[str, Any]) -> None:
        g, r = self.geometry, self.low_rank
        if g.kind == "conv":
            shapes = [(r, g.in_channels, *g.kernel_size), (g.out_channels, r, 1, 1)]
        else:
            shapes = [(r, g.in_channels), (g.out_channels, r)]
        self.factors = nn.ParameterList(_zeros(s, factory) for s in shapes)

    def _init_from_lowrank(self, matrix: Tensor) -> None:
        """Factor the ``(C_out, C_in*kh*kw)`` matrix by its rank-r truncated SVD.

        ``U_r sqrt(S_r)`` and ``sqrt(S_r) V_r^T`` give both factors the same scale,
        which keeps their gradients balanced during fine-tuning. The product is
        exactly what :func:`admm.formats.projections.project_svd` returns.
        """
        r = self.low_rank
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        root = s[:r].sqrt()
        assign(self.factors[0], root[:, None] * vh[:r])
        assign(self.factors[1], u[:, :r] * root)

    def _init_factors(self, weight: Tensor) -> None:
        self._init_from_lowrank(to_matrix(weight))

    def _lowrank_forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        first, last = self.factors
        if self.geometry.kind == "conv":
            return F.conv2d(F.conv2d(x, first, None, **self.geometry.conv_kwargs), last, bias)
        return F.linear(F.linear(x, first), last, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self._lowrank_forward(x, self.bias)

    def _lowrank_dense(self) -> Tensor:
        first, last = self.factors
        r = self.low_rank
        return (last.reshape(-1, r) @ first.reshape(r, -1)).reshape(self.geometry.weight_shape)

    def to_dense_weight(self) -> Tensor:
        return self._lowrank_dense()


class LowRankSparseLayer(SVDLayer):
    """lowrank_sparse (r, k), Yu et al. 2017: the svd pair of L plus a k-sparse kernel S.

    S is stored sparse: ``sparse_values`` ``(k,)`` (trainable) at the flat indices
    ``sparse_index`` ``(k,)`` (int64 buffer, row-major into the dense kernel,
    ascending). ``sparse_form`` says how the forward pass applies S:

    ``dense`` (default)
        S materialised as a dense kernel for one extra conv/linear (the values stay
        the only stored floats); FlopCounterMode counts that conv densely, not the
        ``2*k`` FLOPs per pixel :func:`admm.planning.accounting.factored_flops` assumes.
    ``gather`` (conv only)
        :func:`admm.nn.sparse_conv.sparse_conv2d`: the input columns S touches,
        gathered, times S's ``(n_cols, C_out)`` non-zero columns: ``2*n_cols*C_out``
        FLOPs per pixel, ``n_cols <= k``. Same map, same state_dict; the spec
        records the form (``sparse_form``) so an export rebuilds it.
    """

    format = "lowrank_sparse"
    sparse_form = "dense"

    @property
    def low_rank(self) -> int:
        return self.rank[0]  # type: ignore[index]

    def _build(self, factory: dict[str, Any]) -> None:
        super()._build(factory)
        k = self.rank[1]  # type: ignore[index]
        self.sparse_values = _zeros((k,), factory)
        index_device = factory.get("device")
        self.register_buffer("sparse_index", torch.zeros(k, dtype=torch.long, device=index_device))

    def _init_factors(self, weight: Tensor) -> None:
        self.set_parts(*lowrank_sparse_parts(weight, self.rank))  # type: ignore[arg-type]

    def set_parts(self, low: Tensor, sparse: Tensor) -> None:
        """Fill the factors from ``L`` (matrix rank <= r) and ``S`` (<= k non-zeros), both of the weight's shape.

        Also used by the data-aware fit (:mod:`admm.feature_fit`), whose parts are not GoDec's.
        """
        k = self.rank[1]  # type: ignore[index]
        # rank(L) <= r, so its rank-r SVD reproduces it exactly.
        self._init_from_lowrank(to_matrix(low))
        flat = sparse.flatten()
        # Exactly k slots (the parameter count the plan promised); when S has fewer
        # non-zeros, the spare slots hold zeros at distinct indices.
        index = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        with torch.no_grad():
            self.sparse_index.copy_(index)
        assign(self.sparse_values, flat[index])
        self._refresh_columns()

    def use_sparse_form(self, form: str) -> "LowRankSparseLayer":
        """Apply S as ``form`` (one of ``SPARSE_FORMS``) from now on; returns the layer."""
        if form not in SPARSE_FORMS:
            raise ValueError(f"sparse_form must be one of {SPARSE_FORMS}, got {form!r}")
        if form == "gather" and self.geometry.kind != "conv":
            raise ValueError("sparse_form 'gather' applies to conv layers only; a Linear keeps 'dense'")
        self.sparse_form = form
        if form == "gather" and not getattr(self, "_gather_hooked", False):
            # The column layout derives from sparse_index: rebuild it whenever that buffer is (re)loaded.
            self.register_load_state_dict_post_hook(lambda m, _: m._refresh_columns())
            self._gather_hooked = True
        self._refresh_columns()
        return self

    def _refresh_columns(self) -> None:
        """Recompute the gather form's non-persistent layout buffers from ``sparse_index``."""
        self._gather_cache: dict[tuple, Tensor] = {}
        if self.sparse_form != "gather":
            return
        cols = sparse_columns(self.sparse_index, self.geometry.weight_shape)
        for name, value in (("columns", cols.columns), ("col_of", cols.col_of), ("row_of", cols.row_of)):
            self.register_buffer(f"_s_{name}", value, persistent=False)

    def _gather_forward(self, x: Tensor) -> Tensor:
        g = self.geometry
        padding = conv_padding(g)
        cols = SparseColumns(self._s_columns, self._s_col_of, self._s_row_of)
        in_hw = (int(x.shape[2]), int(x.shape[3]))
        key = (in_hw, x.device)
        index = None if torch.compiler.is_compiling() else self._gather_cache.get(key)
        if index is None:
            index = gather_index(cols.columns, g.in_channels, in_hw, g.kernel_size, g.stride, padding, g.dilation)
            if not torch.compiler.is_compiling():  # a traced graph computes it from static shapes instead
                self._gather_cache[key] = index
        out_hw = ((in_hw[0] + 2 * padding[0] - g.dilation[0] * (g.kernel_size[0] - 1) - 1) // g.stride[0] + 1,
                  (in_hw[1] + 2 * padding[1] - g.dilation[1] * (g.kernel_size[1] - 1) - 1) // g.stride[1] + 1)
        return sparse_conv2d(x, self.sparse_values, cols, index, g.out_channels, padding, out_hw)

    def spec(self) -> dict[str, Any]:
        spec = super().spec()
        if self.sparse_form != "dense":  # absent for the default, so older manifests read the same
            spec["sparse_form"] = self.sparse_form
        return spec

    @classmethod
    def empty(cls, spec: dict[str, Any], *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> "FactoredLayer":
        layer = super().empty(spec, device=device, dtype=dtype)
        form = spec.get("sparse_form", "dense")
        if form != "dense":
            layer.use_sparse_form(str(form))  # type: ignore[attr-defined]
        return layer

    def sparse_dense(self) -> Tensor:
        """S as a dense kernel of the weight's shape (differentiable in ``sparse_values``)."""
        flat = self.sparse_values.new_zeros(math.prod(self.geometry.weight_shape)).scatter(0, self.sparse_index, self.sparse_values)
        return flat.reshape(self.geometry.weight_shape)

    def forward(self, x: Tensor) -> Tensor:
        y = self._lowrank_forward(x, self.bias)
        if self.sparse_values.numel():
            if self.sparse_form == "gather":
                y = y + self._gather_forward(x)
            elif self.geometry.kind == "conv":
                y = y + F.conv2d(x, self.sparse_dense(), None, **self.geometry.conv_kwargs)
            else:
                y = y + F.linear(x, self.sparse_dense())
        return y

    def to_dense_weight(self) -> Tensor:
        return self._lowrank_dense() + self.sparse_dense()


class Tucker2Layer(FactoredLayer):
    """tucker2 (r_out, r_in), Kim et al. 2016: 1x1 ``C_in -> r_in``, kxk ``r_in -> r_out``, 1x1 ``r_out -> C_out``.

    The kxk core conv carries the dense stride/padding/dilation (zero padding
    commutes with a bias-free 1x1 conv, so padding after the first factor is
    exact). Linear: three Linears ``in -> r_in -> r_out -> out``.
    """

    format = "tucker2"

    def _build(self, factory: dict[str, Any]) -> None:
        g = self.geometry
        r_out, r_in = self.rank  # type: ignore[misc]
        if g.kind == "conv":
            shapes = [(r_in, g.in_channels, 1, 1), (r_out, r_in, *g.kernel_size), (g.out_channels, r_out, 1, 1)]
        else:
            shapes = [(r_in, g.in_channels), (r_out, r_in), (g.out_channels, r_out)]
        self.factors = nn.ParameterList(_zeros(s, factory) for s in shapes)

    def _init_factors(self, weight: Tensor) -> None:
        # The same call as project_tucker2 (HOSVD + HOOI sweeps), so that the
        # product of the factors is its Z: W ~ core x_0 U_out x_1 U_in.
        core, u_out, u_in = tucker2_factors(weight, self.rank)  # type: ignore[arg-type]
        assign(self.factors[0], u_in.t())
        assign(self.factors[1], core)
        assign(self.factors[2], u_out)

    def forward(self, x: Tensor) -> Tensor:
        first, core, last = self.factors
        if self.geometry.kind == "conv":
            y = F.conv2d(F.conv2d(x, first), core, None, **self.geometry.conv_kwargs)
            return F.conv2d(y, last, self.bias)
        return F.linear(F.linear(F.linear(x, first), core), last, self.bias)

    def to_dense_weight(self) -> Tensor:
        first, core, last = self.factors
        r_out, r_in = self.rank  # type: ignore[misc]
        core3 = core.reshape(r_out, r_in, -1)
        dense = torch.einsum("oa,abs,bi->ois", last.reshape(-1, r_out), core3, first.reshape(r_in, -1))
        return dense.reshape(self.geometry.weight_shape)


def _exact_cp(w3: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """An exact CP decomposition of ``w3`` ``(O, I, S)`` with ``rank = min(O*I, O*S, I*S)`` terms.

    Any 3-way tensor is the sum of its slices along one mode, each slice a sum of
    rank-1 terms with unit vectors in the two other modes: e.g. with ``I*S``
    terms, term ``(i, s)`` is ``W[:, i, s] (x) e_i (x) e_s``. This is what
    ``project_cp`` returns at full rank (W itself), so the factored layer is exact there.
    """
    o, i, s = w3.shape
    eye = lambda n: torch.eye(n, dtype=w3.dtype, device=w3.device)  # noqa: E731
    if rank == i * s:
        return w3.reshape(o, i * s), eye(i).repeat_interleave(s, 1), eye(s).repeat(1, i)
    if rank == o * s:
        return eye(o).repeat_interleave(s, 1), w3.permute(1, 0, 2).reshape(i, o * s), eye(s).repeat(1, o)
    return eye(o).repeat_interleave(i, 1), eye(i).repeat(1, o), w3.reshape(o * i, s).t()


def _balance(factors: list[Tensor]) -> list[Tensor]:
    """Rescale each CP component so its three factor columns have equal norms (product unchanged).

    ALS leaves the scale wherever it converged; equal norms keep the three
    factor convs' gradients on one scale for fine-tuning.
    """
    norms = [torch.linalg.vector_norm(f, dim=0) for f in factors]
    prod = norms[0] * norms[1] * norms[2]
    geo = prod.pow(1.0 / 3.0)
    return [f * torch.where(prod > 0, geo / n.clamp_min(torch.finfo(n.dtype).tiny), torch.ones_like(n))
            for f, n in zip(factors, norms)]


class CPLayer(FactoredLayer):
    """cp (R), Lebedev et al. 2015: 1x1 ``C_in -> R``, depthwise kxk on R channels, 1x1 ``R -> C_out``.

    The depthwise conv carries the dense stride/padding/dilation; component r's
    kxk kernel is the spatial factor column ``C[:, r]`` reshaped to ``(kh, kw)``,
    so the chain equals the CP kernel exactly. Linear: ``Linear(in, R)``, a
    per-component scale ``(R,)`` (the 1x1 "depthwise" factor), ``Linear(R, out)``;
    FlopCounterMode does not count that element-wise scale (accounting's ``2*R``).
    """

    format = "cp"

    def _build(self, factory: dict[str, Any]) -> None:
        g, big_r = self.geometry, self.rank
        if g.kind == "conv":
            shapes = [(big_r, g.in_channels, 1, 1), (big_r, 1, *g.kernel_size), (g.out_channels, big_r, 1, 1)]
        else:
            shapes = [(big_r, g.in_channels), (big_r,), (g.out_channels, big_r)]
        self.factors = nn.ParameterList(_zeros(s, factory) for s in shapes)  # type: ignore[arg-type]

    def _init_factors(self, weight: Tensor) -> None:
        w3 = to_3way(weight)
        if self.rank == max_rank(weight.shape, "cp"):
            a, b, c = _exact_cp(w3, self.rank)  # type: ignore[arg-type]
        else:
            # The same call as project_cp, so that the product is its Z.
            a, b, c = cp_factors(weight, self.rank)  # type: ignore[arg-type]
        a, b, c = _balance([a, b, c])
        assign(self.factors[0], b.t())
        assign(self.factors[1], c.t())
        assign(self.factors[2], a)

    def forward(self, x: Tensor) -> Tensor:
        first, spatial, last = self.factors
        if self.geometry.kind == "conv":
            y = F.conv2d(x, first)
            y = F.conv2d(y, spatial, None, groups=self.rank, **self.geometry.conv_kwargs)  # type: ignore[arg-type]
            return F.conv2d(y, last, self.bias)
        return F.linear(F.linear(x, first) * spatial, last, self.bias)

    def to_dense_weight(self) -> Tensor:
        first, spatial, last = self.factors
        big_r = self.rank
        dense = torch.einsum("or,ri,rs->ois", last.reshape(-1, big_r), first.reshape(big_r, -1),
                             spatial.reshape(big_r, -1))
        return dense.reshape(self.geometry.weight_shape)


FACTORED_LAYERS: dict[str, type[FactoredLayer]] = {
    cls.format: cls for cls in (SVDLayer, Tucker2Layer, TTLayer, CPLayer, LowRankSparseLayer)
}


def layer_class(fmt: str) -> type[FactoredLayer]:
    try:
        return FACTORED_LAYERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; expected one of {tuple(FACTORED_LAYERS)}") from None


def factorize_module(module: nn.Conv2d | nn.Linear, fmt: str, rank: RankSpec,
                     weight: Tensor | None = None) -> FactoredLayer:
    """The factored layer of ``fmt`` at ``rank`` for a dense ``module`` (factors from ``weight`` if given)."""
    return layer_class(fmt).from_dense(module, rank, weight=weight)
