"""The TT-conv layer (TT-ADMM, Yin et al. 2021; layout of Garipov et al. 2016).

The kernel is held as the TT cores of :func:`admm.projections.tt_cores`, shapes
``TTLayout.core_shapes(rank)`` = ``(r_{j-1}, n_j, r_j)`` with modes
``n = (kh*kw, o_1*i_1, ..., o_d*i_d)`` (no spatial mode for 1x1 convs and
Linear). The forward pass is the one :mod:`admm.accounting` counts:

1. spatial core ``(1, kh*kw, r_1)``: a kxk conv with ``r_1`` filters applied to
   every input channel separately (input viewed as ``(N*C_in, 1, H, W)``; the
   dense layer's stride/padding/dilation go here), giving the state
   ``(N, i_1..i_d, r_1, H_out*W_out)``. Without a spatial mode the input is
   only zero-padded and subsampled by the stride (a 1x1 kernel has nothing to
   convolve).
2. channel core ``j`` ``(r_j, o_j*i_j, r_{j+1})`` contracts ``(i_j, r_j) -> (o_j, r_{j+1})``
   by einsum at output resolution; after the last core the state is
   ``(N, o_1..o_d, H_out*W_out)`` = ``(N, C_out, H_out, W_out)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from admm.layers_base import FactoredLayer, assign
from admm.projections import tt_cores
from admm.reshape import TTLayout, from_tt, tt_layout

__all__ = ["TTLayer"]


class TTLayer(FactoredLayer):
    """TT-format conv/Linear. Parameters: ``cores.j`` of shape ``(r_{j-1}, n_j, r_j)``, plus ``bias``.

    Conv input ``(N, C_in, H, W)`` -> ``(N, C_out, H_out, W_out)``; Linear input
    ``(*, in)`` -> ``(*, out)``. ``rank`` is the max bond rank (each bond is
    ``min(rank, cap)``, :meth:`admm.reshape.TTLayout.ranks`).
    """

    format = "tt"

    def _build(self, factory: dict[str, Any]) -> None:
        self.layout: TTLayout = tt_layout(self.geometry.weight_shape)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.zeros(shape, **factory)) for shape in self.layout.core_shapes(self.rank)
        )

    def _init_factors(self, weight: Tensor) -> None:
        for param, core in zip(self.cores, tt_cores(weight, self.rank)):
            assign(param, core)

    def _spatial(self, x: Tensor) -> tuple[Tensor, int, int]:
        """Step 1: ``(N, C_in, H, W)`` -> state ``(N, C_in, r_1, H_out*W_out)``, ``H_out``, ``W_out``."""
        layout, g = self.layout, self.geometry
        n, c_in, h, w = x.shape
        if layout.has_spatial:
            core = self.cores[0][0]  # (kh*kw, r_1)
            kernel = core.t().reshape(-1, 1, layout.kh, layout.kw)
            u = F.conv2d(x.reshape(n * c_in, 1, h, w), kernel, None, **g.conv_kwargs)
            ho, wo = u.shape[-2:]
            return u.reshape(n, c_in, -1, ho * wo), ho, wo
        # 1x1 kernel: zero padding then stride subsampling is exactly the conv's sampling.
        if not isinstance(g.padding, str) and any(g.padding):
            ph, pw = g.padding
            x = F.pad(x, (pw, pw, ph, ph))
        x = x[:, :, :: g.stride[0], :: g.stride[1]]
        ho, wo = x.shape[-2:]
        return x.reshape(n, c_in, 1, ho * wo), ho, wo

    def _channels(self, state: Tensor) -> Tensor:
        """Step 2: state ``(N, C_in, r_1, P)`` -> ``(N, C_out, P)`` through the channel cores."""
        layout = self.layout
        n = state.shape[0]
        outs, ins = layout.out_factors, layout.in_factors
        channel_cores = list(self.cores)[1:] if layout.has_spatial else list(self.cores)
        for j, core in enumerate(channel_cores):
            r_left, r_right = core.shape[0], core.shape[2]
            g = core.reshape(r_left, outs[j], ins[j], r_right)
            p, q = math.prod(outs[:j]), math.prod(ins[j + 1:])
            # (N, o_1..o_{j-1}, i_j, i_{j+1}..i_d, r_j, P) -> (N, o_1..o_j, i_{j+1}..i_d, r_{j+1}, P)
            state = state.reshape(n, p, ins[j], q, r_left, -1)
            state = torch.einsum("bpiqrx,rois->bpoqsx", state, g)
        return state.reshape(n, layout.c_out, -1)

    def forward(self, x: Tensor) -> Tensor:
        if self.geometry.kind == "linear":
            lead = x.shape[:-1]
            state = x.reshape(-1, self.layout.c_in, 1, 1)
            y = self._channels(state).reshape(*lead, self.layout.c_out)
            return self._add_bias(y)
        state, ho, wo = self._spatial(x)
        y = self._channels(state).reshape(x.shape[0], self.layout.c_out, ho, wo)
        return self._add_bias(y)

    def to_dense_weight(self) -> Tensor:
        full = self.cores[0]
        for core in list(self.cores)[1:]:
            full = torch.tensordot(full, core, dims=([-1], [0]))
        return from_tt(full.reshape(self.layout.modes), self.layout, self.geometry.weight_shape)
