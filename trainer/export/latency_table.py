"""Measured latencies for ``compression.budget=latency``: every planned layer per candidate rank, cached per device.

:func:`measure_costs` times the dense model and every planned layer (dense, and as
its factored module at each rank of :func:`admm.planning.latency_budget.latency_candidates`
and each explicit rank) on the input that layer sees in the model, at the target's
batch and runtime, and returns :class:`admm.planning.latency_budget.LatencyCosts` for the
pure planner. Each number is stored in a JSON cache keyed by everything it depends
on (device name and thread count, torch version, runtime, batch, glibc malloc tuning,
the layer's weight and input shapes and conv arguments, format, rank), so a second plan on the same
device measures nothing. Factored modules are timed with untrained (zero) factors:
dense fp32 kernels do not run faster on zeros.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from admm.config import CompressionConfig, LatencyTarget
from admm.formats.projections import RankSpec, validate_rank
from admm.nn.layers import layer_class
from admm.nn.layers_base import Geometry
from admm.nn.surgery import decompose_model
from admm.planning.latency_budget import LatencyCosts, latency_candidates
from admm.planning.layer_info import describe_layers
from admm.planning.planner import layer_format, select
from admm.planning.rank_plan import RankPlan
from trainer.checkpoints.files import atomic_write_text
from trainer.export.malloc import malloc_tuned
from trainer.hardware import cpu_model

CACHE_ENV = "TDC_LATENCY_CACHE"
CACHE_VERSION = 1


def default_cache_path() -> Path:
    """``$TDC_LATENCY_CACHE``, else ``~/.cache/tdcompress/latency.json``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "tdcompress" / "latency.json"


def device_name(device: torch.device) -> str:
    """What the timings depend on of the device: the GPU's name, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_model()}:{torch.get_num_threads()} threads"


@dataclass
class LatencyCache:
    """Milliseconds by key, in a JSON file; ``measured`` counts the numbers timed (not found) in this process."""

    path: Path
    entries: dict[str, float] = field(default_factory=dict)
    measured: int = 0
    reused: int = 0

    @classmethod
    def open(cls, path: str | Path | None = None) -> "LatencyCache":
        """The cache at ``path`` (default :func:`default_cache_path`); a missing file is an empty cache."""
        p = Path(path) if path is not None else default_cache_path()
        if not p.is_file():
            return cls(p)
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"latency cache {p} cannot be read ({e}); delete it to measure anew") from None
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("ms"), dict):
            raise ValueError(f"latency cache {p} is not a version-{CACHE_VERSION} tdcompress latency cache; "
                             "delete it to measure anew")
        return cls(p, {str(k): float(v) for k, v in data["ms"].items()})

    def get(self, key: dict[str, Any], measure: Callable[[], float]) -> float:
        """The cached ms for ``key``, or ``measure()`` stored under it."""
        k = json.dumps(key, sort_keys=True)
        if k in self.entries:
            self.reused += 1
            return self.entries[k]
        self.entries[k] = ms = float(measure())
        self.measured += 1
        return ms

    def save(self) -> None:
        """Write the file atomically (a reader sees the old or the new cache, never half of one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"version": CACHE_VERSION, "ms": self.entries}, indent=0))


@torch.no_grad()
def _ms(module: nn.Module, shape: tuple[int, ...], device: torch.device, channels_last: bool, repeats: int,
        warmup: int) -> float:
    """The fastest of ``repeats`` timed forward passes of a random batch of ``shape``, in milliseconds.

    The minimum, not the median: other processes on the machine only ever add time to a pass, so the
    fastest pass is the closest to what the layer costs when it has the cores, and a table of minima is
    consistent from layer to layer and with the end-to-end check (which uses the same estimator).
    """
    module = module.to(device).eval()
    x = torch.randn(shape, device=device)
    if channels_last and x.dim() == 4:
        module, x = module.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        module(x)
    sync()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        module(x)
        sync()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def _time_factored(timed: Callable[[nn.Module], float], fmt: str, geometry: Geometry, rank: RankSpec) -> float:
    return timed(layer_class(fmt)(geometry, rank))


def _rank_json(rank: RankSpec) -> Any:
    return list(rank) if isinstance(rank, tuple) else rank


def _timing_setup(compression: CompressionConfig, input_shape: tuple[int, ...], device: str | torch.device
                  ) -> tuple[LatencyTarget, torch.device, bool, tuple[int, ...]]:
    """The latency target of ``compression`` and what timing at it takes: the device, whether channels_last, and
    the batch's input shape (``input_shape`` is one image's ``(1, C, H, W)``)."""
    target = compression.latency
    if target is None:
        raise ValueError("compression.latency: measuring needs compression.budget=latency with compression.latency")
    return target, torch.device(device), target.runtime == "channels_last", (target.batch, *input_shape[1:])


def measure_costs(model: nn.Module, compression: CompressionConfig, input_shape: tuple[int, ...],
                  cache: LatencyCache, *, device: str | torch.device = "cpu", repeats: int = 7, warmup: int = 2,
                  model_repeats: int = 10, say: Callable[[str], None] | None = None) -> LatencyCosts:
    """Time (or find in ``cache``) what a latency plan of ``model`` under ``compression`` needs; save the cache.

    Args:
        input_shape: one image's batch shape ``(1, C, H, W)``; timing uses ``compression.latency.batch``.
        repeats, warmup: forward passes per layer timing (the fastest of ``repeats`` counts).
        model_repeats: forward passes of the whole dense model.
        say: told how many numbers were measured and reused.
    Returns:
        ms per batch of the dense model, of every planned layer dense and at each candidate rank.
    """
    target, device, channels_last, batch_shape = _timing_setup(compression, input_shape, device)
    # glibc's malloc tunables change how large activation buffers are paid for (trainer.export.malloc): part of the key
    base = {"device": device_name(device), "torch": torch.__version__, "runtime": target.runtime,
            "batch": target.batch, "malloc_tuned": malloc_tuned()}
    model = copy.deepcopy(model).to(device).eval()
    arch = hashlib.sha256(repr(model).encode()).hexdigest()[:16]  # the module tree: layers, shapes, conv arguments
    dense_model_ms = cache.get({**base, "what": "model", "arch": arch, "input": list(batch_shape)},
                               lambda: _ms(model, batch_shape, device, channels_last, model_repeats, warmup))
    layers = describe_layers(model, input_shape)
    planned = select(layers, compression.include, compression.exclude, compression.min_channels)
    modules = dict(model.named_modules())
    dense_ms: dict[str, float] = {}
    factored_ms: dict[str, dict[RankSpec, float]] = {}
    for layer in planned:
        module = modules[layer.name]
        geometry = Geometry.of(module)
        fmt = layer_format(layer.shape, compression.format)
        x_shape = ((target.batch, geometry.in_channels, *layer.in_hw) if isinstance(module, nn.Conv2d)
                   else (target.batch, geometry.in_channels))
        key = {**base, "what": "layer", "weight": list(layer.shape), "input": list(x_shape),
               "stride": list(geometry.stride), "padding": geometry.padding if isinstance(geometry.padding, str)
               else list(geometry.padding), "dilation": list(geometry.dilation), "bias": geometry.bias}
        timed = partial(_ms, shape=x_shape, device=device, channels_last=channels_last, repeats=repeats,
                        warmup=warmup)
        dense_ms[layer.name] = cache.get({**key, "format": "dense"}, partial(timed, copy.deepcopy(module)))
        ranks = latency_candidates(layer.shape, fmt, target.points, rank_multiple=compression.rank_multiple,
                                   sparse_fraction=compression.sparse_fraction)
        if layer.name in compression.ranks:
            r = compression.ranks[layer.name]
            ranks.append(validate_rank(layer.shape, fmt, tuple(r) if isinstance(r, (list, tuple)) else r))
        factored_ms[layer.name] = {
            r: cache.get({**key, "format": fmt, "rank": _rank_json(r)}, partial(_time_factored, timed, fmt, geometry, r))
            for r in dict.fromkeys(ranks)}
    cache.save()
    if say is not None:
        say(f"latency table ({base['device']}, torch {base['torch']}, {target.runtime}, batch {target.batch}, "
            f"malloc tuned {base['malloc_tuned']}): "
            f"{cache.measured} timings measured, {cache.reused} reused from {cache.path}")
    return LatencyCosts(dense_model_ms=dense_model_ms, dense_ms=dense_ms, factored_ms=factored_ms,
                        batch=target.batch, runtime=target.runtime, device=base["device"])


def measure_planned(model: nn.Module, plan: RankPlan, compression: CompressionConfig, input_shape: tuple[int, ...],
                    *, device: str | torch.device = "cpu", repeats: int = 10, warmup: int = 2) -> tuple[float, float]:
    """(dense ms, factored ms) per batch of ``model`` and of ``model`` decomposed by ``plan``, timed now, end to end.

    Not cached: this is the check of the plan's prediction, on the same device, runtime and batch.
    """
    target, device, channels_last, batch_shape = _timing_setup(compression, input_shape, device)
    dense = copy.deepcopy(model).to(device).eval()
    factored = decompose_model(copy.deepcopy(model).to(device), plan).eval()
    return (_ms(dense, batch_shape, device, channels_last, repeats, warmup),
            _ms(factored, batch_shape, device, channels_last, repeats, warmup))
