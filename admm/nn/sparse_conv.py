"""A sparse kernel applied at its real density: gather the input columns it touches, one small matmul.

A conv with kernel ``S`` ``(C_out, C_in, kh, kw)`` of ``k`` non-zeros (the sparse
part of low-rank + sparse, under 1% dense on ResNet-20 at 3x) reads, for every
output pixel, only the input columns ``(c, dh, dw)`` that some non-zero uses:
``n_cols <= k`` of the ``C_in*kh*kw`` columns of the dense conv's im2col. So

    y[n, :, p] = S_sub @ x_pad[n, c_j, p*stride + (dh_j, dw_j)*dilation]   for the n_cols columns j,

with ``S_sub`` ``(C_out, n_cols)`` the kernel's non-zero columns. The columns are
one ``index`` (gather) from the zero-padded input viewed pixel-major, so the
output comes out pixel-major too (channels_last memory, as oneDNN convs prefer),
and the product is one GEMM over ``n_cols`` instead of ``C_in*kh*kw``. It is made
of standard operators only (Pad, Reshape, Transpose, GatherND, ScatterND, MatMul),
so it traces to ONNX as it runs in torch.

Of the forms measured on real fitted kernels (bench/sparse_s_bench.py: this one, a
torch.sparse CSR matmul over the same columns, a per-non-zero multiply and
``index_add``, and a per-output-channel padded (ELL) gather), this was kept; see
bench/README.md for the figures.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SparseColumns", "conv_padding", "gather_index", "sparse_columns", "sparse_conv2d"]


def conv_padding(geometry: Any) -> tuple[int, int]:
    """A layer geometry's zero padding as two ints (``"same"`` as torch pads it at stride 1, ``"valid"`` as 0)."""
    padding = geometry.padding
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if any(d * (k - 1) % 2 for k, d in zip(geometry.kernel_size, geometry.dilation)):
            raise ValueError("padding 'same' with an even (dilated) kernel pads unevenly; the gather form pads "
                             "evenly only: keep sparse_form 'dense' for this layer")
        return tuple(d * (k - 1) // 2 for k, d in zip(geometry.kernel_size, geometry.dilation))  # type: ignore[return-value]
    return (int(padding[0]), int(padding[1]))


class SparseColumns:
    """Where a flat-indexed sparse kernel's non-zeros sit, split into columns and output rows.

    ``columns`` ``(n_cols,)``: the distinct im2col columns ``c*kh*kw + dh*kw + dw`` (ascending);
    ``col_of`` ``(k,)``: each non-zero's position in ``columns``; ``row_of`` ``(k,)``: its output channel.
    """

    def __init__(self, columns: Tensor, col_of: Tensor, row_of: Tensor) -> None:
        self.columns, self.col_of, self.row_of = columns, col_of, row_of


def sparse_columns(index: Tensor, weight_shape: tuple[int, ...]) -> SparseColumns:
    """Split the flat row-major ``index`` ``(k,)`` into a kernel of ``weight_shape`` into columns and rows."""
    per_out = 1
    for d in weight_shape[1:]:
        per_out *= int(d)
    flat_col = index % per_out
    columns, col_of = torch.unique(flat_col, sorted=True, return_inverse=True)
    return SparseColumns(columns, col_of, index // per_out)


def _pixel_offsets(columns: Tensor, c_in: int, kernel: tuple[int, int], dilation: tuple[int, int],
                   padded_w: int) -> Tensor:
    """Offset of each column's input element from its output pixel's window corner, in a padded NHWC row."""
    kh, kw = kernel
    c = columns // (kh * kw)
    dh = (columns % (kh * kw)) // kw
    dw = columns % kw
    return (dh * dilation[0] * padded_w + dw * dilation[1]) * c_in + c


def gather_index(columns: Tensor, c_in: int, in_hw: tuple[int, int], kernel: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """``(H_out*W_out, n_cols)`` flat indices into one image of the zero-padded input in NHWC order."""
    hp, wp = in_hw[0] + 2 * padding[0], in_hw[1] + 2 * padding[1]
    h_out = (hp - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    w_out = (wp - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    device = columns.device
    corner = ((torch.arange(h_out, device=device) * stride[0])[:, None] * wp
              + (torch.arange(w_out, device=device) * stride[1])[None, :]).reshape(-1) * c_in
    return corner[:, None] + _pixel_offsets(columns, c_in, kernel, dilation, wp)[None, :]


def sparse_conv2d(x: Tensor, values: Tensor, cols: SparseColumns, index: Tensor, out_channels: int,
                  padding: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    """The conv of ``x`` ``(N, C_in, H, W)`` with the sparse kernel, as ``(N, C_out, H_out, W_out)``.

    ``values`` ``(k,)`` are the non-zeros (differentiable), ``cols`` their layout
    (:func:`sparse_columns`), ``index`` the ``(H_out*W_out, n_cols)`` gather
    (:func:`gather_index`, for this input size). The result is channels_last in memory.
    """
    n = x.shape[0]
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if padding != (0, 0) else x
    rows = xp.permute(0, 2, 3, 1).reshape(n, -1)                      # (N, Hp*Wp*C_in), pixel-major
    gathered = rows[:, index]                                          # (N, L, n_cols)
    sub = values.new_zeros(cols.columns.numel(), out_channels).index_put((cols.col_of, cols.row_of), values)
    y = gathered @ sub                                                 # (N, L, C_out)
    return y.reshape(n, out_hw[0], out_hw[1], out_channels).permute(0, 3, 1, 2)
