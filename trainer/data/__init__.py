"""The dataset registry: each dataset name of the config and the function that loads its splits.

``load_datasets`` dispatches on the name (:data:`DATASETS`; a new dataset is an
entry there plus its name in ``trainer.config.DATASET_NAMES``):

- ``packed``: ``root/train.npz`` and ``root/test.npz``, each holding the
  concatenated JPEG bytes (``jpeg``), ``offsets`` (N+1), ``labels`` (N) and
  ``classes`` (the layout of shared/data/cifar10, see its README). Images are
  decoded with Pillow per item, never all up front.
- ``cifar10`` / ``cifar100``: the torchvision layout under ``root``.
- ``imagenet``: ImageFolder layout ``root/train/<wnid>/*.JPEG``, ``root/val/<wnid>/*``.
- ``synthetic``: seeded random tensors, fixed per index (smoke tests, benchmarks).
- ``shards``: tar shards + ``index.json`` written by ``tdcompress pack`` (trainer/data/shard_writer.py), read per
  rank and loader worker, decoded to uint8 there and normalised on the training device
  (trainer/data/shard_loader.py; its batches differ from the items described below).

Every item is ``(image, label)``: a float32 ``(3, H, W)`` tensor normalised with
the dataset's mean/std, and a Python int that the default collate turns into an
int64 tensor. Train augmentation draws from ``numpy.random.default_rng([seed,
epoch, i])`` for item ``i``, so item ``i`` at epoch ``e`` is the same tensor in
any process, whatever the world size, DataLoader workers or iteration order.
A missing or malformed dataset raises ``DatasetError``; there is never a
fallback to random data. Loaders are :mod:`trainer.data.loaders`; this module
re-exports them so that callers import one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from trainer.config import DATASET_NAMES
from trainer.data.common import (
    CIFAR10_STATS,
    CIFAR100_STATS,
    IMAGENET_STATS,
    ROOT_ENV,
    DatasetError,
    Datasets,
    data_root,
    dataset_error,
    dataset_identity,
    resolve_root,
)
from trainer.data.images import (
    CifarTransform,
    ImageDataset,
    ImageNetTransform,
    PackedSource,
    SyntheticSource,
    image_folder,
    random_crop_flip,
    subset,
    torchvision_cifar,
)
from trainer.data.loaders import StridedEvalSampler, make_loader, set_loader_epoch
from trainer.data.shard_loader import shard_datasets

__all__ = [
    "DATASETS", "DATASET_NAMES", "DATASET_SHAPES", "IMAGENET_STATS", "ROOT_ENV", "CifarTransform", "DatasetError",
    "Datasets", "ImageDataset", "StridedEvalSampler", "data_root", "dataset_identity", "load_datasets", "make_loader",
    "random_crop_flip", "set_loader_epoch",
]


@dataclass(frozen=True)
class LoadOptions:
    """The arguments of :func:`load_datasets` after the dataset name (see there)."""

    root: str | None
    augment: bool
    seed: int
    train_subset: int
    eval_subset: int
    download: bool
    synthetic_train: int
    synthetic_eval: int
    image_size: int | None
    num_classes: int | None
    skip_bad_images: bool
    decode: str
    shuffle_buffer: int


@dataclass(frozen=True)
class DatasetKind:
    """One dataset name: its (classes, image side in px) for planning where the data cannot be opened
    (the driver of a cluster run, `tdcompress plan`), and the function that loads both splits."""

    classes: int
    image_size: int
    load: Callable[[str, LoadOptions], Datasets]


def _splits(train_src: Any, eval_src: Any, transform: Any, classes: list[str], size: int,
            o: LoadOptions) -> Datasets:
    return Datasets(
        train=ImageDataset(train_src, transform, augment=o.augment, seed=o.seed, skip_bad=o.skip_bad_images,
                           indices=subset(len(train_src.labels), o.train_subset, o.seed, split=0)),
        eval=ImageDataset(eval_src, transform, augment=False, seed=o.seed, skip_bad=o.skip_bad_images,
                          indices=subset(len(eval_src.labels), o.eval_subset, o.seed, split=1)),
        num_classes=len(classes), image_size=size, classes=classes,
    )


def _check_asked(dataset: str, size: int, classes: list[str], o: LoadOptions) -> None:
    """A dataset read from disk has its own image size and classes: asking for others is an error."""
    if o.image_size is not None and o.image_size != size:
        raise ValueError(f"image_size={o.image_size} but {dataset!r} images are {size}x{size}")
    if o.num_classes is not None and o.num_classes != len(classes):
        raise ValueError(f"num_classes={o.num_classes} but {dataset!r} has {len(classes)} classes")


def _synthetic(dataset: str, o: LoadOptions) -> Datasets:
    nc, size = o.num_classes or 10, o.image_size or 32
    return _splits(SyntheticSource(o.synthetic_train, nc, size, o.seed, split=0),
                   SyntheticSource(o.synthetic_eval, nc, size, o.seed, split=1), None,
                   [f"class_{k}" for k in range(nc)], size, o)


def _packed(dataset: str, o: LoadOptions) -> Datasets:
    path = resolve_root(dataset, o.root, create=False)
    train_src, eval_src = (PackedSource(dataset, path / f) for f in ("train.npz", "test.npz"))
    if train_src.classes != eval_src.classes or train_src.image_size != eval_src.image_size:
        raise dataset_error(dataset, path, "train.npz and test.npz differ in classes or image size")
    _check_asked(dataset, train_src.image_size, train_src.classes, o)
    return _splits(train_src, eval_src, CifarTransform(CIFAR10_STATS), train_src.classes, train_src.image_size, o)


def _torchvision(dataset: str, o: LoadOptions) -> Datasets:
    path = resolve_root(dataset, o.root, create=o.download)
    (train_src, classes), (eval_src, _) = (torchvision_cifar(dataset, path, t, o.download) for t in (True, False))
    size = int(train_src.data.shape[1])
    _check_asked(dataset, size, classes, o)
    transform = CifarTransform(CIFAR10_STATS if dataset == "cifar10" else CIFAR100_STATS)
    return _splits(train_src, eval_src, transform, classes, size, o)


def _imagenet(dataset: str, o: LoadOptions) -> Datasets:
    path = resolve_root(dataset, o.root, create=False)
    (train_src, classes), (eval_src, eval_classes) = (image_folder(dataset, path / s) for s in ("train", "val"))
    if classes != eval_classes:
        raise dataset_error(dataset, path, "train/ and val/ hold different class folders")
    size = o.image_size or 224
    _check_asked(dataset, size, classes, o)
    return _splits(train_src, eval_src, ImageNetTransform(size), classes, size, o)


def _shards(dataset: str, o: LoadOptions) -> Datasets:
    return shard_datasets(resolve_root(dataset, o.root, create=False), augment=o.augment, seed=o.seed,
                          train_subset=o.train_subset, eval_subset=o.eval_subset, image_size=o.image_size,
                          num_classes=o.num_classes, decode=o.decode, shuffle_buffer=o.shuffle_buffer)


# Dataset name -> what it is and how it loads, keyed by trainer.config.DatasetName.
DATASETS: dict[str, DatasetKind] = {
    "packed": DatasetKind(10, 32, _packed),
    "cifar10": DatasetKind(10, 32, _torchvision),
    "cifar100": DatasetKind(100, 32, _torchvision),
    "imagenet": DatasetKind(1000, 224, _imagenet),
    "synthetic": DatasetKind(10, 32, _synthetic),
    "shards": DatasetKind(1000, 224, _shards),
}
DATASET_SHAPES: dict[str, tuple[int, int]] = {name: (k.classes, k.image_size) for name, k in DATASETS.items()}


def load_datasets(dataset: str, root: str | None, *, augment: bool = True, seed: int = 0,
                  train_subset: int = 0, eval_subset: int = 0, download: bool = False,
                  synthetic_train: int = 1024, synthetic_eval: int = 256,
                  image_size: int | None = None, num_classes: int | None = None,
                  skip_bad_images: bool = False, decode: str = "cpu", shuffle_buffer: int = 2048) -> Datasets:
    """Build the train and eval splits of ``dataset`` (one of ``DATASET_NAMES``).

    Args:
        root: data directory; None falls back to ``$TDC_DATA_ROOT`` (unused by synthetic).
        augment: apply the standard train augmentation (eval is never augmented).
        seed: (>= 0) seeds augmentation, subsets and synthetic data.
        train_subset, eval_subset: if > 0, keep that many items, chosen as the prefix
            of a seeded random permutation (files sorted by class would otherwise give
            one class), kept in file order.
        download: cifar10/cifar100 only: fetch into root when missing.
        synthetic_train, synthetic_eval: synthetic split sizes.
        image_size: synthetic side (default 32), imagenet crop side (default 224);
            for CIFAR-style data it must be None or the native size.
        num_classes: synthetic class count (default 10); elsewhere None or the true count.
        skip_bad_images: an undecodable image is skipped (with a warning naming it), not an error.
        decode, shuffle_buffer: shards only (``data.decode``, ``data.shuffle_buffer``).

    Raises:
        DatasetError: data missing or malformed. ValueError: bad arguments.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    options = LoadOptions(root, augment, seed, train_subset, eval_subset, download, synthetic_train,
                          synthetic_eval, image_size, num_classes, skip_bad_images, decode, shuffle_buffer)
    return DATASETS[dataset].load(dataset, options)
