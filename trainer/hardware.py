"""What a run's numbers depend on of the machine: the CPU model and the kernels torch picks for it.

On CPU the same config and seed give the same weights bit for bit only on the same kind of processor:
torch dispatches its float kernels by the instruction set it finds (``AVX512`` on an AVX-512 Xeon,
``AVX2`` on an AVX2-only EPYC), and kernels that sum in another order give another trajectory.
So a run's device tag names that instruction set, and the CPU model is a tag beside it.
"""
from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The processor's name, e.g. ``Intel(R) Xeon(R) Processor`` (/proc/cpuinfo; ``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # no /proc (macOS): platform.processor() names the CPU well enough
        pass
    return platform.processor() or platform.machine()


def cpu_kernels() -> str:
    """The instruction set torch's CPU kernels are dispatched for: ``AVX512``, ``AVX2``, ``DEFAULT``, ..."""
    return torch.backends.cpu.get_cpu_capability()


def describe_device(device: torch.device, world: int) -> str:
    """E.g. ``cpu x2 (AVX512)`` or ``NVIDIA H200 x8``: what the run trained on (the ``device`` tag of the parent run)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x{world}"
    return f"cpu x{world} ({cpu_kernels()})"
