"""The ``shards`` dataset: packed tar shards (``tdcompress pack``) read per rank and loader worker.

:class:`ShardSplit` is what ``load_datasets("shards", ...)`` returns per split; ``make_loader``
turns it into a :class:`ShardLoader` for one rank. Loader processes decode and crop to uint8
(``(B, H, W, 3)``), or with ``decode="gpu"`` hand the encoded bytes on; the loader normalises
(and on the GPU decodes) on the training device, so a batch comes out as float32
``(B, 3, H, W)`` there (channels_last on a GPU) and int64 labels ``(B,)`` on the CPU.
Which samples each rank and worker reads, and in what order: :mod:`trainer.data.shards`.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.data.common import IMAGENET_STATS, DatasetError, Datasets
from trainer.data.decode import (
    decode_batch_gpu,
    decode_eval,
    decode_train,
    decode_train_tv,
    eval_crop_box,
    normalize_on_device,
    resized_crop_box,
)
from trainer.data.shards import (
    Shard,
    ShardError,
    buffer_order,
    epoch_plan,
    load_index,
    ordered_samples,
    split_shards,
    stream_slices,
)

_ITEM_TAG, _BUFFER_TAG = 0x17E3, 0xB0FF


class ShardSplit:
    """One split of a shard directory, not yet bound to a rank: ``len()`` is its sample count."""

    def __init__(self, root: Path, index: dict, split: str, *, train: bool, augment: bool, seed: int, size: int,
                 limit: int = 0, decode: str = "cpu", shuffle_buffer: int = 2048) -> None:
        self.shards = split_shards(root, index, split)
        self.counts = [s.samples for s in self.shards]
        if limit:  # a subset: the first `limit` samples of the packed (shuffled) order
            if not 0 < limit <= sum(self.counts):
                raise ValueError(f"subset size must be in [0, {sum(self.counts)}], got {limit}")
            keep, total = [], 0
            for c in self.counts:
                keep.append(min(c, limit - total))
                total += keep[-1]
            self.shards = [s for s, c in zip(self.shards, keep) if c > 0]
            self.counts = [c for c in keep if c > 0]
        self.train, self.augment, self.seed, self.size = train, augment, seed, size
        self.decode, self.shuffle_buffer = decode, shuffle_buffer
        # Train decoder: "tv" (torchvision.io.decode_jpeg + tensor crop: 1.07-1.19x Pillow per core in
        # bench/input_pipeline.py), "pil" (Pillow with DCT-domain reduced decode where the crop allows) or
        # "pil_nodraft". Same crop and flip draws in all three; pixels differ by ~0.01 levels on average.
        self.decoder = "tv"
        self.epoch = 0

    def __len__(self) -> int:
        return sum(self.counts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def loader(self, batch_size: int, *, rank: int, world_size: int, shuffle: bool, drop_last: bool,
               num_workers: int = 0, device: torch.device | str | None = None) -> "ShardLoader":
        """Rank ``rank``'s loader: training (``shuffle`` or ``drop_last``) or evaluation (every sample once)."""
        stream = _RankStream(self, batch_size, rank, world_size, max(1, num_workers), train=shuffle or drop_last,
                             shuffle=shuffle)
        return ShardLoader(stream, num_workers, device)


class _RankStream(IterableDataset):
    """The batches of one rank: each loader worker yields its own contiguous share (see trainer.data.shards)."""

    def __init__(self, split: ShardSplit, batch: int, rank: int, world: int, workers: int, *, train: bool,
                 shuffle: bool) -> None:
        self.split, self.batch, self.rank, self.world, self.workers = split, batch, rank, world, workers
        self.train, self.shuffle = train, shuffle
        self.epoch, self.skip_batches = 0, 0
        if train and sum(split.counts) < world * batch:
            raise DatasetError(f"{sum(split.counts)} training samples give no full batch of {batch} on each of "
                               f"{world} ranks; lower data.batch_size")

    def _plan(self, worker: int) -> tuple[list[int], int, int]:
        return epoch_plan(self.split.counts, epoch=self.epoch, seed=self.split.seed, rank=self.rank,
                          world=self.world, worker=worker, workers=self.workers, batch=self.batch, train=self.train,
                          shuffle=self.shuffle)

    def __len__(self) -> int:
        spans = [self._plan(w) for w in range(self.workers)]
        return sum(-(-(end - start) // self.batch) for _, start, end in spans)

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"planned for {self.workers} loader workers, running on {info.num_workers}")
        order, start, end = self._plan(worker)
        n, split = end - start, self.split
        emit = (buffer_order(n, split.shuffle_buffer,
                             np.random.default_rng([split.seed, _BUFFER_TAG, self.epoch, self.rank, worker]))
                if self.shuffle else np.arange(n))
        # Output batch i of this rank came from worker i % W (the DataLoader's round robin): skip this worker's share.
        skip = len(range(worker, self.skip_batches, self.workers)) * self.batch
        items = ordered_samples(split.shards, stream_slices(split.counts, order, start, end), emit, skip)
        chunk: list[tuple[int, bytes, int]] = []
        for item in items:
            chunk.append(item)
            if len(chunk) == self.batch:
                yield self._collate(chunk, start)
                chunk = []
        if chunk:  # only in evaluation: training ranges are whole batches
            yield self._collate(chunk, start)

    def _collate(self, chunk: list[tuple[int, bytes, int]], start: int) -> tuple:
        split, size = self.split, self.split.size
        labels = torch.tensor([y for _, _, y in chunk], dtype=torch.int64)
        # Augmentation draws are keyed by the sample's stream position in this epoch: resume redraws them.
        rngs = [np.random.default_rng([split.seed, _ITEM_TAG, self.epoch, start + p]) if self.train and split.augment
                else None for p, _, _ in chunk]
        if split.decode == "gpu":
            boxes, flips = [], []
            for (_, data, _), rng in zip(chunk, rngs):
                with Image.open(io.BytesIO(data)) as im:  # the header only: the size for the crop box
                    w, h = im.size
                boxes.append(resized_crop_box(w, h, rng) if rng is not None else eval_crop_box(w, h, size))
                flips.append(rng is not None and rng.random() < 0.5)
            encoded = [torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()) for _, data, _ in chunk]
            return encoded, torch.tensor(boxes, dtype=torch.int64), torch.tensor(flips), labels
        x = np.empty((len(chunk), size, size, 3), dtype=np.uint8)
        for i, ((p, data, _), rng) in enumerate(zip(chunk, rngs)):
            try:
                x[i] = (decode_eval(data, size) if rng is None else decode_train_tv(data, size, rng)
                        if split.decoder == "tv" else decode_train(data, size, rng, draft=split.decoder == "pil"))
            except (OSError, ValueError, SyntaxError) as exc:
                raise ShardError(f"sample at position {start + p} of this epoch's stream (rank {self.rank}) cannot "
                                 f"be decoded: {exc}; rerun `tdcompress pack`") from exc
        return torch.from_numpy(x), labels


class ShardLoader:
    """Batches ``(x float32 (B, 3, H, W) on the device, y int64 (B,))`` of one rank; ``len()`` = batches per epoch."""

    def __init__(self, stream: _RankStream, num_workers: int, device: torch.device | str | None) -> None:
        if device is None:  # the worker's current CUDA device (trainer.worker sets it) where there is one
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if stream.split.decode == "gpu" and self.device.type != "cuda":
            raise DatasetError(f"data.decode=gpu needs a CUDA device on the worker, got {self.device}; "
                               "use data.decode=cpu")
        self.stream, self.dataset = stream, stream.split
        mean, std = (torch.tensor(s, dtype=torch.float32, device=self.device) for s in IMAGENET_STATS)
        self.mean, self.inv_std = mean * 255, 1 / (std * 255)
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers,
                                 pin_memory=self.device.type == "cuda")

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order and augmentation; ``skip_batches`` resumes after that many batches of it."""
        if epoch < 0 or skip_batches < 0:
            raise ValueError(f"epoch and skip_batches must be >= 0, got {epoch}, {skip_batches}")
        self.stream.epoch, self.stream.skip_batches = int(epoch), int(skip_batches)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            if self.stream.split.decode == "gpu":
                encoded, boxes, flips, y = batch
                x = decode_batch_gpu(encoded, boxes, flips, self.stream.split.size, self.device)
            else:
                x, y = batch
            yield normalize_on_device(x, self.device, self.mean, self.inv_std), y


def shard_datasets(root: Path, *, augment: bool, seed: int, train_subset: int, eval_subset: int,
                   image_size: int | None, num_classes: int | None, decode: str = "cpu",
                   shuffle_buffer: int = 2048) -> Datasets:
    """Both splits (``train``, ``val``) of the shard directory ``root``; only the index is read here."""
    index = load_index(root)
    classes = [str(c) for c in index["classes"]]
    size = image_size or 224
    if num_classes is not None and num_classes != len(classes):
        raise ValueError(f"num_classes={num_classes} but {root / 'index.json'} has {len(classes)} classes")
    kw = dict(seed=seed, size=size, decode=decode, shuffle_buffer=shuffle_buffer)
    return Datasets(train=ShardSplit(root, index, "train", train=True, augment=augment, limit=train_subset, **kw),
                    eval=ShardSplit(root, index, "val", train=False, augment=False, limit=eval_subset, **kw),
                    num_classes=len(classes), image_size=size, classes=classes)


__all__ = ["Shard", "ShardLoader", "ShardSplit", "shard_datasets"]
