"""Find a model's conv/linear layers and their shapes (the planner's input)."""
from __future__ import annotations

import torch
from torch import nn

from admm.planning.rank_plan import LayerInfo


def describe_layers(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[LayerInfo]:
    """Every dense Conv2d (groups == 1) and Linear of ``model``, in module order.

    Args:
        input_shape: (N, C, H, W) of a dummy input; when given, one forward pass on
            the model's device records each conv's input and output size (for FLOPs).
            Without it, spatial sizes are (1, 1): enough for ranks, not for FLOPs.
    """
    layers = [(n, m) for n, m in model.named_modules()
              if (isinstance(m, nn.Conv2d) and m.groups == 1) or isinstance(m, nn.Linear)]
    sizes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
    if input_shape is not None:
        def recorder(name: str):
            def hook(mod, inputs, output):
                if output.ndim == 4:
                    sizes[name] = (tuple(inputs[0].shape[-2:]), tuple(output.shape[-2:]))
            return hook

        handles = [m.register_forward_hook(recorder(n)) for n, m in layers]
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            with torch.no_grad():
                model(torch.zeros(input_shape, device=device))
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
    out = []
    for name, m in layers:
        in_hw, out_hw = sizes.get(name, ((1, 1), (1, 1)))
        out.append(LayerInfo(name=name, shape=tuple(m.weight.shape), out_hw=out_hw, in_hw=in_hw))
    return out
