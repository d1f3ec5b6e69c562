"""Data-parallel loaders: training batches from ``DistributedSampler``, evaluation strided over the ranks."""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


class StridedEvalSampler(Sampler[int]):
    """Rank r of w gets indices r, r+w, r+2w, ... of range(n): no padding, no shuffle.

    Ranks may get one item more or less than each other, but every item is seen
    exactly once over all ranks, so summed correct counts are exact.
    """

    def __init__(self, n: int, *, rank: int, world_size: int) -> None:
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def make_loader(ds: Dataset, batch_size: int, *, rank: int, world_size: int, shuffle: bool,
                seed: int, drop_last: bool, num_workers: int = 0, device: torch.device | str | None = None) -> Any:
    """Rank ``rank``'s loader of ``ds``: batches ``(x (B, 3, H, W) float32, y (B,) int64)``.

    Training (``shuffle`` or ``drop_last`` set) uses ``DistributedSampler`` with
    ``shuffle, seed, drop_last``, which gives every rank the same number of
    batches, as the data-parallel collectives need. Its permutation depends on
    ``(seed, epoch)`` only, and rank r takes positions r, r+w, r+2w, ... of it,
    so the union over ranks of rank r's batch s equals batch s of a 1-rank
    loader with batch ``batch_size * world_size`` (positions s*w*b .. (s+1)*w*b - 1
    of the permutation), for every full batch. That is what makes 1-worker and
    w-worker runs comparable. ``drop_last`` also drops a final short batch.

    Evaluation (neither set) uses ``StridedEvalSampler``: indices[r::w], unpadded, so
    every item counts exactly once over the ranks.

    Workers are not persistent, so each ``iter(loader)`` forks them with the
    dataset epoch set by ``set_loader_epoch``.

    A ``shards`` split gets its own loader (trainer/data/shard_loader.py: same batch contract, uint8
    decode in the workers, normalised on ``device``; None = the current CUDA device, else CPU).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    if hasattr(ds, "loader"):  # a shards split (trainer.data.shard_loader.ShardSplit)
        return ds.loader(batch_size, rank=rank, world_size=world_size, shuffle=shuffle, drop_last=drop_last,
                         num_workers=num_workers, device=device)
    sampler: Sampler[int]
    if shuffle or drop_last:
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                     seed=seed, drop_last=drop_last)
    else:
        sampler = StridedEvalSampler(len(ds), rank=rank, world_size=world_size)  # type: ignore[arg-type]
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available())


def set_loader_epoch(loader: Any, epoch: int) -> None:
    """Set the epoch of the loader's sampler (shuffle order) and dataset (augmentation draws).

    Call before ``iter(loader)`` each epoch.
    """
    if hasattr(loader, "set_epoch"):  # a shards loader: order, augmentation and resume position in one
        loader.set_epoch(epoch)
        return
    for obj in (loader.sampler, loader.dataset):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)
