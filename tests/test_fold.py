"""BatchNorm folding: the folded model computes what the unfolded one did in eval mode, dense or factored."""
from __future__ import annotations

import pytest
import torch

from admm.config import CompressionConfig
from admm.nn.fold import apply_folding, fold_batchnorm
from admm.nn.surgery import apply_manifest, decompose_model, manifest_of
from admm.planning.model_plan import plan_for_model
from trainer.models import build_model


def _trained_bn(model):
    """Give BNs non-trivial statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("fmt", [None, "svd", "tucker2", "cp", "lowrank_sparse", "tt"])
def test_folding_preserves_outputs_and_reloads(fmt):
    torch.manual_seed(0)
    model = _trained_bn(build_model("resnet20", 10))
    if fmt:
        model = decompose_model(model, plan_for_model(model, CompressionConfig(format=fmt, keep_ratio=0.5)))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        pairs = fold_batchnorm(model)
        out = model(x)
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert len(pairs) >= (1 + 2 + 18 if fmt != "tt" else 1 + 2), (fmt, len(pairs))  # stem, downsample, blocks
    assert bns == (0 if fmt != "tt" else 18)  # TT's output is not scaled by one factor: its BN stays
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # The structure rebuilds from the manifest + folded pairs and loads strictly.
    fresh = apply_folding(build_model("resnet20", 10), pairs)  # dense producers gain their bias first
    if fmt:
        fresh = apply_manifest(fresh, manifest_of(model))
    fresh.eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, rtol=1e-4, atol=1e-4)
