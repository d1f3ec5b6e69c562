"""Helpers shared by the benchmarks: device and version banner, a one-rank process group,
CUDA-synchronised timing, synthetic batches.

No Ray, no MLflow: the benchmarks run on a bare GPU box as well as on a laptop.
On a GPU they use cuda (bf16 autocast through the engine's Precision,
channels_last inputs); otherwise the CPU in fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from cluster.dist import init_local_group
from trainer.malloc import malloc_tuned, reexec_with_tuned_malloc

__all__ = ["Timing", "add_malloc_option", "apply_malloc_option", "banner", "banner_line", "classes_for", "cpu_count",
           "device_name", "image_size", "init_process_group", "pick_device", "sync", "synthetic_batch", "time_fn",
           "write_json"]


def pick_device() -> torch.device:
    """cuda when a GPU is visible, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_model()}"


def _version(package: str) -> str:
    # Read from the installed metadata: importing deepspeed here would probe accelerators
    # before prepare_deepspeed_env() has set DS_ACCELERATOR.
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def add_malloc_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="CPU: keep glibc's default malloc (CPU training workers and `tdcompress evaluate` "
                             "run with trainer.malloc's tunables)")


def apply_malloc_option(args: argparse.Namespace, device: torch.device) -> None:
    """On CPU, re-run this process with the malloc tunables unless ``--no-malloc-tuning``; call it first."""
    if not args.no_malloc_tuning and device.type != "cuda":
        reexec_with_tuned_malloc()


def banner(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, for the first printed line and the JSON output."""
    info: dict[str, Any] = {
        "device": device_name(device), "device_type": device.type,
        "torch": torch.__version__, "deepspeed": _version("deepspeed"), "tensorly": _version("tensorly"),
        "python": platform.python_version(), "cpus": cpu_count(), "torch_threads": torch.get_num_threads(),
        "malloc_tuned": malloc_tuned(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    if hasattr(os, "getloadavg"):  # other work on the host shows up here (and in the spread of repeats)
        info["load_1min"] = round(os.getloadavg()[0], 2)
    return info


def banner_line(info: dict[str, Any]) -> str:
    cuda = f" (CUDA {info['cuda']})" if "cuda" in info else ""
    return (f"device: {info['device']}{cuda} | {info['cpus']} CPUs, {info['torch_threads']} torch threads | "
            f"torch {info['torch']} | deepspeed {info['deepspeed']} | tensorly {info['tensorly']} | "
            f"python {info['python']} | malloc tuned {info['malloc_tuned']}"
            + (f" | load {info['load_1min']}" if "load_1min" in info else ""))


def init_process_group(device: torch.device) -> None:
    """A one-rank process group in this process (gloo on CPU, nccl on a GPU): the engine needs one."""
    init_local_group(gpu=device.type == "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call of the timed repeats (warmup excluded)."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "median": self.median}


def time_fn(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times, each timed on its own.

    The device is synchronised before the clock starts and after each call, so a
    GPU's queued work is counted in the call that queued it.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return Timing(times)


def classes_for(model: str) -> int:
    """ImageNet classes for the torchvision ResNets, CIFAR-10 for the rest."""
    return 1000 if model in ("resnet18", "resnet50") else 10


def image_size(model: str, device: torch.device) -> int:
    """224 px for the ImageNet models on a GPU, 64 px on CPU (to finish in minutes); 32 px for CIFAR models."""
    if model in ("resnet18", "resnet50"):
        return 224 if device.type == "cuda" else 64
    return 32


def synthetic_batch(batch: int, size: int, classes: int, device: torch.device, channels_last: bool,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch ``(x, y)`` on ``device``; x is channels_last when asked (as the train loop feeds it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}", flush=True)
