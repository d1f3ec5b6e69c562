"""Low-rank + sparse at its real density: ways to apply a fitted sparse kernel S, and the whole model's latency.

    python -m bench.sparse_s_bench CHECKPOINT [--keep 0.33] [--calib 128] [--batches 1 32] [--fitted PATH]

CHECKPOINT is a dense CIFAR checkpoint (or a run directory: its latest). Every planned
layer is decomposed as lowrank_sparse at ``--keep`` with the feature fit
(``decompose.fit: features``, ``--calib`` training images), BatchNorm folded, as an export is.
``--fitted PATH`` reuses the fitted model a previous run saved there (written when missing).

Part 1, per layer, S alone at the input shape the layer sees, CPU fp32, channels_last, median
ms: the dense S conv (what ``sparse_form: dense`` runs) against four sparse forms: ``gather``
(the input columns S touches, one GEMM: :mod:`admm.nn.sparse_conv`, the kept one), ``csr``
(the same columns times S as a torch.sparse CSR matrix), ``index_add`` (each non-zero's
column times its value, accumulated per output channel) and ``ell`` (non-zeros grouped by
output channel, padded to the longest group, one batched product).

Part 2, the whole model in one process: the dense model, low-rank + sparse with S dense, with
S gathered in every layer, and the per-layer choice of :func:`trainer.export.latency.layer_latency_table`
(what ``tdcompress export --tune-batch N`` exports), at each batch; FLOPs per image counted by
FlopCounterMode for each, and each latency as a ratio to the dense model's.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from admm.config import CompressionConfig
from admm.nn.fold import fold_batchnorm
from admm.nn.layers import LowRankSparseLayer
from admm.nn.realize import realize
from admm.nn.sparse_conv import conv_padding, gather_index, sparse_columns
from admm.nn.surgery import apply_manifest, manifest_of
from admm.planning.model_plan import plan_for_model
from bench.common import add_json_option, device_name, start
from trainer.checkpoints import files as ckpt
from trainer.checkpoints.stateful import restore_model
from trainer.data import load_datasets, make_loader
from trainer.export.latency import factored_input_shapes, layer_latency_table, measure_latency
from trainer.models import build_model
from trainer.phases.decompose import measured_flops
from trainer.phases.feature_decompose import calibration_sample, decompose_by_features


def _median_ms(fn: Callable[[Tensor], Tensor], x: Tensor, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def s_forms(layer: LowRankSparseLayer, in_hw: tuple[int, int]) -> dict[str, Callable[[Tensor], Tensor]]:
    """Each way to compute S * x for inputs of spatial size ``in_hw``, as ``(N, C_out, H_out, W_out)``."""
    g = layer.geometry
    values = layer.sparse_values.detach()
    cols = sparse_columns(layer.sparse_index, g.weight_shape)
    pad = conv_padding(g)
    index = gather_index(cols.columns, g.in_channels, in_hw, g.kernel_size, g.stride, pad, g.dilation)
    s_dense = layer.sparse_dense().detach()
    h_out = (in_hw[0] + 2 * pad[0] - g.dilation[0] * (g.kernel_size[0] - 1) - 1) // g.stride[0] + 1
    w_out = (in_hw[1] + 2 * pad[1] - g.dilation[1] * (g.kernel_size[1] - 1) - 1) // g.stride[1] + 1
    c_out, n_cols = g.out_channels, cols.columns.numel()
    sub = values.new_zeros(n_cols, c_out).index_put((cols.col_of, cols.row_of), values)
    sub_csr = sub.t().contiguous().to_sparse_csr()  # (C_out, n_cols)
    counts = torch.bincount(cols.row_of, minlength=c_out)
    width = int(counts.max())
    order = torch.argsort(cols.row_of, stable=True)
    slot = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts)[cols.row_of[order]]
    ell_col = torch.zeros(c_out, width, dtype=torch.long)
    ell_val = values.new_zeros(c_out, width)
    ell_col[cols.row_of[order], slot] = cols.col_of[order]
    ell_val[cols.row_of[order], slot] = values[order]
    ell_index = index[:, ell_col.reshape(-1)]

    def columns(x: Tensor, idx: Tensor) -> Tensor:
        xp = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
        return xp.permute(0, 2, 3, 1).reshape(x.shape[0], -1)[:, idx]

    def out(y: Tensor) -> Tensor:
        return y.reshape(y.shape[0], h_out, w_out, c_out).permute(0, 3, 1, 2)

    def index_add(x: Tensor) -> Tensor:
        prod = columns(x, index)[:, :, cols.col_of] * values
        return out(prod.new_zeros(x.shape[0], h_out * w_out, c_out).index_add_(2, cols.row_of, prod))

    def csr(x: Tensor) -> Tensor:
        flat = columns(x, index).reshape(-1, n_cols)
        return out(torch.sparse.mm(sub_csr, flat.t()).t().reshape(x.shape[0], -1, c_out))

    return {
        "dense": lambda x: F.conv2d(x, s_dense, None, **g.conv_kwargs),
        "gather": lambda x: out(columns(x, index) @ sub),
        "csr": csr,
        "index_add": index_add,
        "ell": lambda x: out(torch.einsum("nlcm,cm->nlc", columns(x, ell_index).reshape(
            x.shape[0], -1, c_out, width), ell_val)),
    }


def fitted_model(args: argparse.Namespace) -> nn.Module:
    """The feature-fitted lowrank_sparse model, BN folded (read from / written to ``--fitted``)."""
    if args.fitted and args.fitted.is_file():
        saved = torch.load(args.fitted, weights_only=True)
        model = apply_manifest(build_model(saved["model"], saved["num_classes"]), saved["manifest"])
        model.load_state_dict(saved["state"])
    else:
        path = args.checkpoint
        if (path / "checkpoints").is_dir():
            path = ckpt.latest_checkpoint(path / "checkpoints")
        meta = ckpt.read_meta(path)
        dense = restore_model(build_model(meta["model"], meta["num_classes"]), ckpt.load_shared(path)["model"]).eval()
        sets = load_datasets(meta["dataset"], None, augment=False, seed=0, train_subset=max(args.calib, 128))
        loader = make_loader(sets.train, 128, rank=0, world_size=1, shuffle=True, seed=0, drop_last=True)
        plan = plan_for_model(dense, CompressionConfig(format="lowrank_sparse", keep_ratio=args.keep),
                              input_shape=(1, 3, 32, 32))
        model, _ = decompose_by_features(dense, plan, calibration_sample(loader, max(1, args.calib // 128)),
                                         torch.device("cpu"))
        if args.fitted:
            tmp = args.fitted.with_name(args.fitted.name + ".tmp")
            torch.save({"model": meta["model"], "num_classes": meta["num_classes"], "manifest": manifest_of(model),
                        "state": model.state_dict()}, tmp)
            tmp.replace(args.fitted)
    model.eval()
    fold_batchnorm(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--keep", type=float, default=0.33)
    ap.add_argument("--calib", type=int, default=128, help="calibration images for the feature fit")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--fitted", type=Path, help="reuse (or write) the fitted model here")
    add_json_option(ap)
    args = ap.parse_args()
    device = torch.device("cpu")
    report = start("sparse_s_bench", device, args)
    print(f"device: {device_name(device)}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    model = fitted_model(args)
    size = 32
    shapes = factored_input_shapes(model, (1, 3, size, size), device)
    print("part 1: S alone, channels_last, median ms (ratio to the dense S conv)")
    for batch in args.batches:
        for name, shape in shapes.items():
            layer = model.get_submodule(name)
            forms = s_forms(layer, shape[2:])
            x = torch.randn(batch, *shape[1:]).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                ref = forms["dense"](x)
                worst = max(float((f(x) - ref).abs().max()) for f in forms.values())
            ms = {k: _median_ms(f, x, args.repeats) for k, f in forms.items()}
            k, n_cols = layer.rank[1], sparse_columns(layer.sparse_index, layer.geometry.weight_shape).columns.numel()
            print(f"b{batch:<3d} {name:16s} {tuple(layer.geometry.weight_shape)!s:16s} k {k:4d} cols {n_cols:4d}  "
                  + "  ".join(f"{f} {v:6.3f} ({v / ms['dense']:.2f})" for f, v in ms.items())
                  + f"  max|diff| {worst:.1e}", flush=True)
            report.add({"kind": "s_form", "batch": batch, "layer": name, "k": k, "n_cols": n_cols, "ms": ms,
                        "max_abs_diff": worst})
    print("part 2: whole model, channels_last, median ms (ratio to dense); FLOPs per image (FlopCounterMode)")
    path = args.checkpoint
    if (path / "checkpoints").is_dir():
        path = ckpt.latest_checkpoint(path / "checkpoints")
    meta = ckpt.read_meta(path)
    dense = restore_model(build_model(meta["model"], meta["num_classes"]), ckpt.load_shared(path)["model"]).eval()
    fold_batchnorm(dense)
    gathered = realize(copy.deepcopy(model), {n: "sparse" for n in shapes})
    for batch in args.batches:
        rows = layer_latency_table(model, (batch, 3, size, size), channels_last=True)
        tuned = realize(copy.deepcopy(model), {r.name: r.choice for r in rows if r.choice != "factored"})
        choices = {c: sum(r.choice == c for r in rows) for c in ("factored", "dense", "sparse")}
        variants = {"dense model": dense, "lrs, S dense": model, "lrs, S gather": gathered, "lrs, tuned": tuned}
        ms = {k: 1e3 * measure_latency(copy.deepcopy(m), (batch, 3, size, size), repeats=args.repeats,
                                       channels_last=True) for k, m in variants.items()}
        flops = {k: measured_flops(m, (1, 3, size, size)) for k, m in variants.items()}
        for k in variants:
            print(f"b{batch:<3d} {k:14s} {ms[k]:8.2f} ms ({ms[k] / ms['dense model']:.2f})  "
                  f"{flops[k] / 1e6:7.1f} MFLOPs ({flops['dense model'] / flops[k]:.2f}x fewer)", flush=True)
        print(f"b{batch:<3d} tuned choices: {choices}", flush=True)
        report.add({"kind": "model", "batch": batch, "ms": ms, "flops": flops, "choices": choices})
    report.finish()


if __name__ == "__main__":
    main()
