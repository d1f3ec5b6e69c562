"""Atomic, safely loaded checkpoints written by every rank.

Layout under ``root``::

    latest                 name of the newest complete checkpoint (atomic rename)
    ckpt-000003/meta.json  phase, epoch, step, world size (rank 0)
               shared.pt   model weights, optimizer/scheduler state, manifests (rank 0)
               rank0.pt    per-rank state: ADMM shards, ZeRO optimizer partitions
               rank1.pt    ...

All ranks write into ``ckpt-N.tmp``; after a barrier rank 0 renames it to
``ckpt-N`` and only then points ``latest`` at it, so a crash at any moment
leaves the previous checkpoint intact. Files hold tensors and plain Python
containers only and are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(root: str | Path, index: int, *, shared: dict[str, Any], per_rank: dict[str, Any],
                    meta: dict[str, Any], keep: int = 2) -> Path:
    """Collectively write checkpoint number ``index``; every rank must call this.

    Args:
        shared: written by rank 0 only (other ranks may pass anything).
        per_rank: this rank's own state.
        meta: JSON-serialisable description (rank 0's is written).
        keep: complete checkpoints kept; older ones are deleted.
    Returns:
        The final checkpoint directory.
    """
    root = Path(root)
    rank = _rank()
    final = root / f"ckpt-{index:06d}"
    tmp = root / f"ckpt-{index:06d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        tmp.mkdir()
    _barrier()
    torch.save(per_rank, tmp / f"rank{rank}.pt")
    if rank == 0:
        torch.save(shared, tmp / "shared.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    _barrier()
    if rank == 0:
        if final.exists():  # re-saving the same index after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", final.name)
        done = sorted(p for p in root.glob("ckpt-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"checkpoint pointer {pointer} names {path}, which is incomplete")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "meta.json").read_text())


def load_shared(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path / "shared.pt", map_location=map_location, weights_only=True)


def load_rank(path: Path, rank: int, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path / f"rank{rank}.pt", map_location=map_location, weights_only=True)


def load_all_ranks(path: Path, map_location: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Every rank's file, in rank order (used to re-shard on a world-size change)."""
    world = read_meta(path)["world_size"]
    return [load_rank(path, r, map_location) for r in range(world)]
