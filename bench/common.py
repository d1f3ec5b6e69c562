"""The benchmarks' harness: device and version banner, one JSON shape, a one-rank process group,
CUDA-synchronised timing, synthetic batches.

Every benchmark is run as ``python -m bench.<name>`` from the repository root, prints
:func:`banner_line` first and, with ``--json PATH``, writes a :class:`Report`:

    {"schema": "tdcompress-bench/1", "benchmark": NAME, "complete": bool, "banner": {...},
     "args": {...}, "results": [row, ...], "extra": {...}}

``results`` holds one dict per measured row (the rows the script prints); ``extra`` holds
what is not a row (a decode-only table, the HOOI study, ...). The file is rewritten after
every row with ``complete: false``, so a run cut short by a time limit leaves what it measured.

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
from trainer.export.malloc import malloc_tuned, reexec_with_tuned_malloc
from trainer.hardware import cpu_kernels, cpu_model

__all__ = ["SCHEMA", "Report", "Timing", "add_json_option", "add_malloc_option", "apply_malloc_option", "banner", "banner_line", "classes_for", "cpu_count",
           "device_name", "image_size", "init_process_group", "peak_memory_gib", "pick_device", "start", "sync",
           "synthetic_batch", "time_fn"]

SCHEMA = "tdcompress-bench/1"


def pick_device() -> torch.device:
    """cuda when a GPU is visible, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_model()} ({cpu_kernels()} kernels)"


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
                             "run with trainer.export.malloc's tunables)")


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


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory torch allocated on ``device`` since the process started or the last reset, in GiB; None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the results here (bench/common.py: the shape)")


class Report:
    """One benchmark run's results, written to ``path`` (when given) in the shape of the module docstring."""

    def __init__(self, benchmark: str, info: dict[str, Any], args: dict[str, Any], path: str | Path | None) -> None:
        self.benchmark, self.info, self.args = benchmark, info, args
        self.path = Path(path) if path else None
        self.results: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}

    def payload(self, complete: bool) -> dict[str, Any]:
        return {"schema": SCHEMA, "benchmark": self.benchmark, "complete": complete, "banner": self.info,
                "args": self.args, "results": self.results, "extra": self.extra}

    def _write(self, complete: bool) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        # default=str: rows may hold tuples of ranks, paths or dtypes; the JSON is for reading, not round trips
        tmp.write_text(json.dumps(self.payload(complete), indent=1, default=str))
        os.replace(tmp, self.path)  # a reader never sees half a file

    def add(self, row: dict[str, Any]) -> None:
        """Record one row and rewrite the file (``complete: false``)."""
        self.results.append(row)
        self._write(complete=False)

    def finish(self, **extra: Any) -> None:
        """Record ``extra`` and write the file as complete."""
        self.extra.update(extra)
        self._write(complete=True)
        if self.path is not None:
            print(f"wrote {self.path}", flush=True)


def start(benchmark: str, device: torch.device, args: argparse.Namespace | dict[str, Any] | None) -> Report:
    """Print the banner line for ``device`` and open the run's :class:`Report` (``args.json`` is its path)."""
    info = banner(device)
    print(banner_line(info), flush=True)
    fields = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return Report(benchmark, info, fields, fields.get("json"))
