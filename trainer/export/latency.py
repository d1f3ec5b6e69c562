"""Inference latency: of a whole model, and per factored layer for each exact realization.

The per-layer table drives :func:`admm.nn.realize.realize`: every factored layer is
timed on the input shape it sees in the model (captured with a forward hook), as
each of its realizations (factored chain, merged, dense), on the device, batch
and memory format the model will be served with. A layer keeps its factored
form unless another realization is faster by more than ``margin``.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from admm.nn.layers_base import FactoredLayer
from admm.nn.realize import alternatives


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _input(shape: tuple[int, ...], device: torch.device, channels_last: bool) -> torch.Tensor:
    x = torch.randn(shape, device=device)
    return x.to(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@torch.no_grad()
def _median_seconds(fn: nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> float:
    sync = _sync(x.device)
    for _ in range(warmup):
        fn(x)
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], *, repeats: int = 20, warmup: int = 3,
                    device: str | torch.device = "cpu", channels_last: bool = False) -> float:
    """Median seconds per forward pass of a random batch of ``input_shape`` (N, C, H, W), in eval mode.

    With ``channels_last`` both the input and the model's 4-d weights use that
    memory format (on CPU, oneDNN's convolutions are much faster in it).
    """
    device = torch.device(device)
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return _median_seconds(model, _input(input_shape, device, channels_last), repeats, warmup)


@dataclass(frozen=True)
class LayerTiming:
    """One factored layer's measured realizations: ``ms`` maps realization -> median milliseconds."""

    name: str
    format: str
    input_shape: tuple[int, ...]
    ms: dict[str, float]
    choice: str

    @property
    def speedup(self) -> float:
        """factored time / chosen time (>= 1)."""
        return self.ms["factored"] / self.ms[self.choice]


@torch.no_grad()
def factored_input_shapes(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> dict[str, tuple]:
    """Input shape of every FactoredLayer of ``model`` for one forward pass of ``input_shape``."""
    shapes: dict[str, tuple] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: shapes.__setitem__(n, tuple(args[0].shape)))
               for n, m in model.named_modules() if isinstance(m, FactoredLayer)]
    try:
        model.eval()(torch.zeros(input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return shapes


def layer_latency_table(model: nn.Module, input_shape: tuple[int, ...], *, device: str | torch.device = "cpu",
                        channels_last: bool = False, repeats: int = 7, warmup: int = 2, margin: float = 0.03,
                        progress: Callable[[LayerTiming], None] | None = None) -> list[LayerTiming]:
    """Time every realization of every factored layer of ``model`` at its input shape; choose the fastest.

    Args:
        input_shape: the model's input ``(N, C, H, W)``; N is the batch the model will serve.
        margin: a realization other than ``factored`` is chosen only when it is
            faster by more than this fraction (ties keep the smaller, factored form).
        progress: called with each layer's row as soon as it is measured.

    Returns:
        One :class:`LayerTiming` per factored layer, in module order.
    """
    device = torch.device(device)
    shapes = factored_input_shapes(model, input_shape, device)
    modules = dict(model.named_modules())
    rows = []
    for name, shape in shapes.items():
        layer = modules[name]
        x = _input(shape, device, channels_last)
        ms = {}
        for kind, module in alternatives(layer).items():
            module = module.eval()
            if channels_last and x.dim() == 4:
                module = module.to(memory_format=torch.channels_last)
            ms[kind] = 1e3 * _median_seconds(module, x, repeats, warmup)
        best = min(ms, key=ms.__getitem__)
        choice = best if ms[best] < ms["factored"] * (1 - margin) else "factored"
        row = LayerTiming(name, layer.format, shape, ms, choice)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def format_row(row: LayerTiming) -> str:
    """One line of the table: layer, format, input shape, every realization's ms, the choice."""
    cells = "  ".join(f"{k} {v:7.2f}" for k, v in row.ms.items())
    return f"{row.name:24s} {row.format:8s} {str(row.input_shape):22s} {cells}  -> {row.choice} ({row.speedup:.2f}x)"
