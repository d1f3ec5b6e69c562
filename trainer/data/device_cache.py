"""Small datasets on the training device (``data.device_cache``): decode once, augment and normalise there.

CIFAR-sized data fits in device memory many times over (CIFAR-10 train: 50,000 x 3 x 32 x 32 uint8 =
154 MB), so instead of decoding and augmenting every image in loader processes every epoch, the
split is decoded once into a uint8 tensor on the device, and each batch is gathered, randomly
cropped (4-pixel zero padding) and flipped, and normalised there in a few batched ops. On a GPU this
removes the CPU from the step; the same code runs on the CPU (the tests use it).

The order of images is the CPU path's: the loader takes its indices from the same samplers as
:func:`trainer.data.make_loader` (``DistributedSampler`` for training, ``StridedEvalSampler`` for
evaluation), so rank r's batch s holds the same images in both paths. The augmentation draws
differ (one seeded device generator per rank and epoch instead of one numpy generator per item)
but follow the same distribution: crop offsets uniform over -pad..pad on each axis, flip with
probability 1/2 (tests/test_device_data.py checks both). Normalisation uses the CPU transform's
own constants, so an unaugmented batch equals the CPU path's bit for bit.
"""
from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler
from torch.utils.data.distributed import DistributedSampler

from trainer.config import DEVICE_CACHE_DATASETS
from trainer.data.common import DatasetError
from trainer.data.images import CifarTransform, ImageDataset
from trainer.data.loaders import StridedEvalSampler

_AUG_TAG = 0xDE7CA  # keeps this seed stream apart from the others drawn from the run's seed


def decode_split(ds: ImageDataset, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every item of ``ds`` (its subset, in order) once.

    Returns:
        images ``(N, 3, H, W)`` uint8 and labels ``(N,)`` int64, on the CPU. An undecodable image
        raises :class:`DatasetError` naming it, or with ``ds.skip_bad`` is left out (warned, counted).
    """
    if not isinstance(ds.transform, CifarTransform):
        raise ValueError("data.device_cache: holds CIFAR-style datasets (32x32 crop + flip) only: "
                         f"{', '.join(DEVICE_CACHE_DATASETS)}")
    n = len(ds)
    src = np.arange(n) if ds.indices is None else ds.indices

    def one(j: int) -> np.ndarray | None:
        try:
            return np.asarray(ds.source.image(int(src[j])))
        except (OSError, ValueError, SyntaxError) as exc:  # what Pillow raises for broken files
            where = ds.source.describe(int(src[j]))
            if not ds.skip_bad:
                raise DatasetError(f"image {j} ({where}) cannot be decoded: {type(exc).__name__}: {exc}; fix or "
                                   "remove it, or set data.skip_bad_images=true to skip such images") from exc
            print(f"warning: skipped undecodable image {j} ({where}): {exc}", file=sys.stderr, flush=True)
            return None

    # Pillow releases the GIL while decoding, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(one, range(n), chunksize=256))
    keep = [j for j, im in enumerate(decoded) if im is not None]
    if not keep:
        raise DatasetError(f"no image of this split can be decoded ({n} tried)")
    ds.skipped += n - len(keep)
    images = torch.from_numpy(np.stack([decoded[j] for j in keep])).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(ds.labels[keep].astype(np.int64))


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop of the zero-padded batch back to its size, then a random horizontal flip, per image.

    ``x``: ``(B, C, H, W)`` (any dtype, on the generator's device). Image b's output pixel (y, x) is
    its input pixel (y + dy, x + dx) (zero outside), dy, dx uniform in -pad..pad, then mirrored
    left-right with probability 1/2: :func:`trainer.data.random_crop_flip`, batched.
    """
    b, _, h, w = x.shape
    dev = x.device
    shift = torch.randint(-pad, pad + 1, (b, 2), device=dev, generator=generator)
    flip = torch.rand(b, device=dev, generator=generator) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = torch.arange(h, device=dev)[None, :] + pad + shift[:, :1]  # (B, H) rows of the padded image
    cols = torch.arange(w, device=dev)[None, :] + pad + shift[:, 1:]  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(b, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


class DeviceDataset:
    """One split as uint8 images and labels on a device; ``set_epoch`` picks the augmentation draws.

    ``scale``/``shift`` (per channel): normalised = pixel * scale - shift, the CPU transform's constants.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, scale: np.ndarray, shift: np.ndarray,
                 augment: bool, seed: int, pad: int = 4) -> None:
        dev = images.device
        self.images, self.labels = images, labels.to(dev)
        self.scale = torch.as_tensor(scale, dtype=torch.float32, device=dev)[:, None, None]
        self.shift = torch.as_tensor(shift, dtype=torch.float32, device=dev)[:, None, None]
        self.augment, self.seed, self.pad, self.epoch = augment, seed, pad, 0

    def __len__(self) -> int:
        return int(self.labels.numel())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def generator(self, rank: int) -> torch.Generator:
        """The augmentation generator of ``rank`` for the current epoch (fixed by seed, epoch, rank)."""
        seed = int(np.random.SeedSequence([self.seed, _AUG_TAG, self.epoch, rank]).generate_state(1)[0])
        return torch.Generator(device=self.images.device).manual_seed(seed)

    def batch(self, index: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``index`` (on the device): float32 ``(B, 3, H, W)`` normalised images and int64 labels."""
        x = self.images[index]
        if self.augment and generator is not None:
            x = crop_flip(x, generator, self.pad)
        return x.float() * self.scale - self.shift, self.labels[index]


class DeviceLoader:
    """Batches of a :class:`DeviceDataset` in ``sampler`` order; a drop-in for the project's DataLoaders
    (``len``, iteration, ``.sampler`` and ``.dataset`` for :func:`trainer.data.set_loader_epoch`)."""

    def __init__(self, dataset: DeviceDataset, sampler: Sampler[int], batch_size: int, *, drop_last: bool,
                 rank: int) -> None:
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.drop_last, self.rank = drop_last, rank

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.as_tensor(list(self.sampler), dtype=torch.long).to(self.dataset.images.device)
        gen = self.dataset.generator(self.rank) if self.dataset.augment else None
        for s in range(len(self)):
            yield self.dataset.batch(order[s * self.batch_size:(s + 1) * self.batch_size], gen)


def make_device_loader(ds: ImageDataset, batch_size: int, *, rank: int, world_size: int, shuffle: bool,
                       seed: int, drop_last: bool, device: torch.device) -> DeviceLoader:
    """Like :func:`trainer.data.make_loader` (same samplers, so the same images per batch), with the
    split decoded once into ``device`` memory and augmented (if ``ds.augment``) and normalised there."""
    images, labels = decode_split(ds)
    norm = ds.transform.normalize  # type: ignore[union-attr]  # decode_split checked it is a CifarTransform
    data = DeviceDataset(images.to(device), labels, scale=norm.scale, shift=norm.shift, augment=ds.augment,
                         seed=seed)
    sampler: Sampler[int]
    if shuffle or drop_last:
        sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=shuffle,  # type: ignore
                                     seed=seed, drop_last=drop_last)
    else:
        sampler = StridedEvalSampler(len(data), rank=rank, world_size=world_size)
    return DeviceLoader(data, sampler, batch_size, drop_last=drop_last, rank=rank)


def device_loaders(train: ImageDataset, eval: ImageDataset, train_batch: int, eval_batch: int, *, rank: int,
                   world_size: int, seed: int, device: torch.device) -> tuple[DeviceLoader, DeviceLoader]:
    """The train loader (shuffled, drop_last) and eval loader (sharded, unpadded) of ``data.device_cache``,
    with :func:`trainer.data.make_loader`'s batch semantics."""
    return (make_device_loader(train, train_batch, rank=rank, world_size=world_size, shuffle=True, seed=seed,
                               drop_last=True, device=device),
            make_device_loader(eval, eval_batch, rank=rank, world_size=world_size, shuffle=False, seed=seed,
                               drop_last=False, device=device))
