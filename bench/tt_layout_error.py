"""TT projection error, channel-aligned layout (admm) vs the old spatial-first TT-matrix layout, at equal params.

For each weight and parameter budget (``--keep`` x dense), each layout gets the largest
int rank whose cores fit, and the relative error ||W - TT-SVD(W)|| / ||W|| is printed
with the parameter counts. Weights: a constructed kernel with decaying out/in channel
spectra (tests/test_tt_layout.channel_structured), a Gaussian one, and, with
``--checkpoint``, every planned 3x3 conv of a trained model (a trainer checkpoint's
``shared.pt``). The old layout exists only as the reference in tests/test_tt_layout.py.

    python -m bench.tt_layout_error --checkpoint runs/.../ckpt-000001/shared.pt --model resnet20
"""
from __future__ import annotations

import argparse
import statistics

import torch

from admm.formats.projections import max_rank, project_tt
from admm.planning.accounting import dense_params, factored_params
from bench.common import add_json_option, start
from tests.test_tt_layout import (
    channel_structured,
    largest_within,
    old_layout_params,
    old_layout_tt,
    rel,
)


def compare(w: torch.Tensor, keep: float) -> tuple[float, float, int, int]:
    """(new error, old error, new params, old params) at ``keep`` x dense params."""
    budget = keep * dense_params(w.shape)
    r_new = largest_within(lambda r: factored_params(w.shape, "tt", r), budget, max_rank(w.shape, "tt"))
    r_old = largest_within(lambda r: old_layout_params(w.shape, r), budget, 4 * max(w.shape))
    return (rel(project_tt(w, r_new), w), rel(old_layout_tt(w, r_old)[0], w),
            factored_params(w.shape, "tt", r_new), old_layout_params(w.shape, r_old))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", default="0.5,0.33")
    p.add_argument("--checkpoint", help="a trainer checkpoint's shared.pt (dense model weights)")
    p.add_argument("--model", default="resnet20")
    add_json_option(p)
    args = p.parse_args()
    report = start("tt_layout_error", torch.device("cpu"), args)
    torch.manual_seed(0)
    weights = {"constructed 64x64x3x3": channel_structured(64, 64),
               "gaussian 64x64x3x3": torch.randn(64, 64, 3, 3)}
    if args.checkpoint:
        state = torch.load(args.checkpoint, weights_only=True, map_location="cpu")["model"]["weights"]
        convs = {k: v.float() for k, v in state.items()
                 if k.endswith(".weight") and v.ndim == 4 and v.shape[-1] == 3 and min(v.shape[:2]) >= 16}
        weights.update({f"{args.model} {k[:-7]}": v for k, v in convs.items()})
    print("weight                               keep   new err (params)    old err (params)   new/old")
    for keep in (float(k) for k in args.keep.split(",")):
        ratios = []
        for name, w in weights.items():
            new, old, pn, po = compare(w, keep)
            ratios.append(new / old)
            report.add({"weight": name, "keep": keep, "new_error": new, "old_error": old, "new_params": pn,
                        "old_params": po})
            print(f"{name:36s} {keep:.2f}   {new:.3f} ({pn:7,d})   {old:.3f} ({po:7,d})   {new / old:.2f}",
                  flush=True)
        trained = ratios[2:]
        if trained:
            print(f"  {args.model} convs at keep {keep}: new/old error median {statistics.median(trained):.2f}, "
                  f"min {min(trained):.2f}, max {max(trained):.2f} over {len(trained)} layers")
    report.finish()


if __name__ == "__main__":
    main()
