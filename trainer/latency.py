"""Inference latency of a model: median wall time per batch after warm-up."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...], *, repeats: int = 20, warmup: int = 3,
                    device: str | torch.device = "cpu") -> float:
    """Median seconds per forward pass of a random batch of ``input_shape`` (N, C, H, W)."""
    model.eval()
    x = torch.randn(input_shape, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
