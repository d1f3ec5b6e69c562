"""The TT-conv layer in the channel-aligned layout of the TT-ADMM code (Yin et al., CVPR 2021).

The kernel is held as the TT cores of :func:`admm.formats.projections.tt_cores`, shapes
``TTLayout.core_shapes(rank)`` = ``(r_{j-1}, n_j, r_j)`` over the modes
``(o_1..o_p, kh*kw, i_1..i_q)`` (no ``kh*kw`` for 1x1 convs and Linear). Name the
bonds ``(1, a_1..a_p, b_0..b_{q-1}, 1)``: ``a_p`` sits left of the spatial mode,
``b_0`` right of it. The forward pass is the chain :mod:`admm.planning.accounting` counts:

1. in-channel cores ``i_q, ..., i_1``: with the input channels-last as
   ``(N*H*W, i_1..i_q)``, core ``i_j`` is one matmul that maps the trailing
   ``(i_j, b_j)`` to ``b_{j-1}``; the state ends as ``(N*H*W, b_0)``.
2. spatial core ``(a_p, kh*kw, b_0)``: a kxk conv ``b_0 -> a_p`` channels carrying
   the dense conv's stride/padding/dilation. (1x1 kernels have no spatial core:
   the input is zero-padded and subsampled by the stride before step 1, and
   ``b_0`` is ``a_p``, the bond between ``i_1`` and ``o_p``.)
3. out-channel cores ``o_p, ..., o_1``: core ``o_j`` maps the trailing ``a_j`` to
   ``(o_j, a_{j-1})``, one matmul each, leaving ``(N*H_out*W_out, o_p..o_1)``; one
   permute puts the digits back in row-major channel order.

Every step is a plain 2-D matmul on a channels-last activation (a
``channels_last`` input needs no copy), which is also how the TT-ADMM code runs
its TT conv. A chain runs instead as its one contracted matrix (:meth:`TTLayer.in_matrix`,
:meth:`TTLayer.out_matrix`) when that costs fewer MACs per pixel
(:func:`admm.planning.accounting.tt_chain_costs`). The matrices are contracted from the cores at every
forward, in training and inference alike: a cache keyed on the cores' version counters went stale
under torch's fused SGD, which updates parameters without bumping them (eval accuracy fell ~11
points in a study run), and the contraction costs MACs per forward, not per image (ResNet-50 at 2x,
CPU: 1.06x / 0.91x dense at batch 1 / 8 against 1.18x / 0.94x cached). With one int rank the inner bonds sit at their caps,
the per-core matmuls are skinny (4-64 columns) and cost more MACs than the matrix: merged, a
3x3 layer is one 1x1 matmul, the kxk conv, one 1x1 matmul, and the out-chain's digit permute
goes away. (Measured, bench/README.md: ResNet-50 at 2x fewer parameters, CPU, 2.1x / 2.3x faster
than per-core chains at batch 1 / 8.) :func:`admm.nn.realize.merged_module` gives the same map as a Tucker-2
or svd layer (the two chains contracted into matrices) for the latency table.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from admm.formats.projections import tt_cores
from admm.formats.reshape import TTLayout, from_tt, tt_layout
from admm.nn.layers_base import FactoredLayer, assign
from admm.planning.accounting import tt_chain_costs

__all__ = ["TTLayer"]


class TTLayer(FactoredLayer):
    """TT-format conv/Linear. Parameters: ``cores.j`` of shape ``(r_{j-1}, n_j, r_j)``, plus ``bias``.

    Conv input ``(N, C_in, H, W)`` -> ``(N, C_out, H_out, W_out)`` (channels-last
    strides); Linear input ``(*, in)`` -> ``(*, out)``. ``rank`` is an int (each bond
    ``min(rank, cap)``) or one rank per bond, :meth:`admm.formats.reshape.TTLayout.ranks`.
    """

    format = "tt"
    # False: always run the per-core chains (the TT-ADMM code's way; for comparison, bench/inference_speed.py).
    merge_chains: bool = True

    def _build(self, factory: dict[str, Any]) -> None:
        self.layout: TTLayout = tt_layout(self.geometry.weight_shape)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(shape, **factory)) for shape in self.layout.core_shapes(self.rank)
        )
        self._in_cost, self._out_cost = tt_chain_costs(self.geometry.weight_shape, self.rank)

    def _init_factors(self, weight: Tensor) -> None:
        for param, core in zip(self.cores, tt_cores(weight, self.rank)):
            assign(param, core)

    def _matrices(self) -> tuple[Tensor | None, Tensor | None]:
        """The merged in- and out-chain matrices this forward uses (None: that chain runs core by core)."""
        merge_in = self.merge_chains and self._in_cost.merge
        merge_out = self.merge_chains and self._out_cost.merge
        return (self.in_matrix() if merge_in else None), (self.out_matrix() if merge_out else None)

    # -- the three groups of cores ------------------------------------------------------
    @property
    def out_cores(self) -> list[Tensor]:
        """Cores of ``o_1..o_p``, shapes ``(a_{j-1}, o_j, a_j)``."""
        return list(self.cores)[: len(self.layout.out_factors)]

    @property
    def spatial_core(self) -> Tensor | None:
        """The ``(a_p, kh*kw, b_0)`` core, or None for 1x1 kernels and Linear."""
        return self.cores[len(self.layout.out_factors)] if self.layout.has_spatial else None

    @property
    def in_cores(self) -> list[Tensor]:
        """Cores of ``i_1..i_q``, shapes ``(b_{j-1}, i_j, b_j)``."""
        return list(self.cores)[len(self.cores) - len(self.layout.in_factors):]

    def in_matrix(self) -> Tensor:
        """The in-channel chain as one matrix ``(b_0, C_in)`` (step 1 as a single 1x1 conv)."""
        m = self.in_cores[-1].reshape(-1, self.layout.in_factors[-1])  # (b_{q-1}, i_q)
        for core in reversed(self.in_cores[:-1]):
            m = (core.reshape(-1, core.shape[2]) @ m).reshape(core.shape[0], -1)  # (b_{j-1}, i_j..i_q)
        return m

    def out_matrix(self) -> Tensor:
        """The out-channel chain as one matrix ``(C_out, a_p)`` (step 3 as a single 1x1 conv)."""
        m = self.out_cores[0].reshape(-1, self.out_cores[0].shape[2])  # (o_1, a_1)
        for core in self.out_cores[1:]:
            m = (m @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[2])  # (o_1..o_j, a_j)
        return m

    def spatial_kernel(self) -> Tensor:
        """The spatial core as a conv kernel ``(a_p, b_0, kh, kw)``."""
        core = self.spatial_core
        assert core is not None, "1x1 kernels have no spatial core"
        return core.transpose(1, 2).reshape(core.shape[0], core.shape[2], *self.geometry.kernel_size)

    # -- forward ------------------------------------------------------------------------
    def _in_chain(self, state: Tensor, matrix: Tensor | None = None) -> Tensor:
        """Step 1: ``(P, C_in)`` -> ``(P, b_0)``, contracting ``i_q`` first (its outer bond is 1)."""
        rows = state.shape[0]
        if matrix is not None:
            return state @ matrix.t()
        for core in reversed(self.in_cores):  # (b_{j-1}, i_j, b_j)
            state = state.reshape(-1, core.shape[1] * core.shape[2]) @ core.reshape(core.shape[0], -1).t()
        return state.reshape(rows, -1)

    def _out_chain(self, state: Tensor, matrix: Tensor | None = None) -> Tensor:
        """Step 3: ``(P, a_p)`` -> ``(P, C_out)`` in row-major channel order."""
        rows = state.shape[0]
        if matrix is not None:
            return state @ matrix.t()  # the matrix's rows are the channels in row-major order
        outs = self.layout.out_factors
        for core in reversed(self.out_cores):  # (a_{j-1}, o_j, a_j): trailing a_j -> (o_j, a_{j-1})
            state = state.reshape(-1, core.shape[2]) @ core.permute(2, 1, 0).reshape(core.shape[2], -1)
        p = len(outs)
        if p > 1:  # digits come out as (o_p..o_1); o_1 must vary slowest
            state = state.reshape(rows, *reversed(outs)).permute(0, *range(p, 0, -1))
        return state.reshape(rows, self.layout.c_out)

    def forward(self, x: Tensor) -> Tensor:
        layout, g = self.layout, self.geometry
        m_in, m_out = self._matrices()
        if g.kind == "linear":
            lead = x.shape[:-1]
            y = self._out_chain(self._in_chain(x.reshape(-1, layout.c_in), m_in), m_out)
            return self._add_bias(y.reshape(*lead, layout.c_out))
        if not layout.has_spatial:
            # 1x1 kernel: zero padding then stride subsampling is exactly the conv's sampling.
            if not isinstance(g.padding, str) and any(g.padding):
                ph, pw = g.padding
                x = F.pad(x, (pw, pw, ph, ph))
            x = x[:, :, :: g.stride[0], :: g.stride[1]]
        n, _, h, w = x.shape
        state = self._in_chain(x.permute(0, 2, 3, 1).reshape(-1, layout.c_in), m_in)  # (N*H*W, b_0)
        if layout.has_spatial:
            u = state.reshape(n, h, w, -1).permute(0, 3, 1, 2)  # channels-last (N, b_0, H, W)
            u = F.conv2d(u, self.spatial_kernel(), None, **g.conv_kwargs)
            h, w = u.shape[-2:]
            state = u.permute(0, 2, 3, 1).reshape(-1, u.shape[1])  # (N*H_out*W_out, a_p)
        y = self._out_chain(state, m_out).reshape(n, h, w, layout.c_out).permute(0, 3, 1, 2)
        return self._add_bias(y)

    def to_dense_weight(self) -> Tensor:
        full = self.cores[0]
        for core in list(self.cores)[1:]:
            full = torch.tensordot(full, core, dims=([-1], [0]))
        return from_tt(full.reshape(self.layout.modes), self.layout, self.geometry.weight_shape)
