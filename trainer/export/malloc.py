"""CPU inference: keep glibc's malloc from handing large activation buffers back to the kernel.

glibc serves every allocation above its mmap threshold (32 MiB at most) with a
fresh ``mmap`` and unmaps it on free, so each large activation of a CNN at batch
32 costs page faults and kernel zero-filling of every page, on every forward
pass. On this project's 2-core CPU host that was 30% of a dense ResNet-50
forward at batch 32 (1011 -> 695 ms, channels_last) and more of a factored one
(802 -> 456 ms), because page faults do not shrink with FLOPs. With
``mmap_max=0`` and a high trim threshold the freed buffers stay in the heap and
are reused. The tunables are read once at process start, so the process has to
re-execute itself with them set; :func:`reexec_with_tuned_malloc` does that.
"""
from __future__ import annotations

import os
import platform
import sys

__all__ = ["TUNABLES", "has_glibc", "malloc_tuned", "reexec_with_tuned_malloc", "tuned_env", "with_tunables"]

TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"
_MARK = "TDC_MALLOC_TUNED"


def has_glibc() -> bool:
    """True on Linux with glibc, the only place the tunables mean anything."""
    return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def with_tunables(existing: str) -> str:
    """A ``GLIBC_TUNABLES`` value: ``existing`` (others' tunables, kept) plus :data:`TUNABLES`."""
    return f"{existing}:{TUNABLES}" if existing else TUNABLES


def malloc_tuned(env: dict[str, str] | None = None) -> bool:
    """True when ``env`` (default: this process's) already carries the tunables (or opted out)."""
    env = os.environ if env is None else env
    return bool(env.get(_MARK)) or "glibc.malloc.mmap_max" in env.get("GLIBC_TUNABLES", "")


def tuned_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` with :data:`TUNABLES` appended to ``GLIBC_TUNABLES`` (others kept)."""
    out = dict(os.environ if env is None else env)
    out["GLIBC_TUNABLES"] = with_tunables(out.get("GLIBC_TUNABLES", ""))
    out[_MARK] = "1"
    return out


def reexec_with_tuned_malloc() -> None:
    """Re-run this process (same interpreter and argv) with the tunables set; return if not applicable.

    Does nothing on anything but Linux with glibc, or when the tunables (or
    ``TDC_MALLOC_TUNED``) are already in the environment, so it runs at most once.
    Call it first thing, before any work that should not be repeated.
    """
    if not has_glibc() or malloc_tuned():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], tuned_env())
