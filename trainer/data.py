"""Datasets and data-parallel loaders.

``load_datasets`` builds the train and eval splits of one dataset:

- ``packed``: ``root/train.npz`` and ``root/test.npz``, each holding the
  concatenated JPEG bytes (``jpeg``), ``offsets`` (N+1), ``labels`` (N) and
  ``classes`` (the layout of shared/data/cifar10, see its README). Images are
  decoded with Pillow per item, never all up front.
- ``cifar10`` / ``cifar100``: the torchvision layout under ``root``.
- ``imagenet``: ImageFolder layout ``root/train/<wnid>/*.JPEG``, ``root/val/<wnid>/*``.
- ``synthetic``: seeded random tensors, fixed per index (smoke tests, benchmarks).
- ``shards``: tar shards + ``index.json`` written by ``tdcompress pack`` (trainer/pack.py), read per
  rank and loader worker, decoded to uint8 there and normalised on the training device
  (trainer/shard_loader.py; its batches differ from the items described below).

Every item is ``(image, label)``: a float32 ``(3, H, W)`` tensor normalised with
the dataset's mean/std, and a Python int that the default collate turns into an
int64 tensor. Train augmentation draws from ``numpy.random.default_rng([seed,
epoch, i])`` for item ``i``, so item ``i`` at epoch ``e`` is the same tensor in
any process, whatever the world size, DataLoader workers or iteration order.
A missing or malformed dataset raises ``DatasetError``; there is never a
fallback to random data.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from trainer.config import DATASET_NAMES
from trainer.decode import resized_crop_box as _resized_crop_box

__all__ = [
    "DATASET_NAMES", "DATASET_SHAPES", "ROOT_ENV", "DatasetError", "Datasets", "ImageDataset", "ShardSampler",
    "data_root", "load_datasets", "make_loader", "set_loader_epoch",
]

ROOT_ENV = "TDC_DATA_ROOT"

# (classes, image side in px) of each dataset, keyed by trainer.config.DatasetName: for planning
# where the data cannot be opened (the driver of a cluster run, `tdcompress plan`).
DATASET_SHAPES: dict[str, tuple[int, int]] = {
    "packed": (10, 32), "cifar10": (10, 32), "cifar100": (100, 32), "imagenet": (1000, 224), "synthetic": (10, 32),
    "shards": (1000, 224),
}

# Per-channel mean/std of pixel values in [0, 1]. CIFAR-10's are the true
# per-pixel std (62.99/255 ...), not the often-copied 0.2023/0.1994/0.2010.
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

_SUBSET_TAG, _SYNTH_TAG = 0x5B5E7, 0x5A7  # keep seed streams of different uses apart
_HOW = {
    "packed": "a directory holding train.npz and test.npz (layout: shared/data/cifar10/README.md)",
    "cifar10": "the torchvision CIFAR-10 directory, or set data.download=true when online",
    "cifar100": "the torchvision CIFAR-100 directory, or set data.download=true when online",
    "imagenet": "a directory holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG",
    "shards": "a directory holding index.json and the .tar shards written by `tdcompress pack`",
}


class DatasetError(Exception):
    """A dataset is missing or malformed; the message says where and how to fix it."""


def _error(dataset: str, path: Path | str | None, problem: str) -> DatasetError:
    return DatasetError(
        f"dataset {dataset!r}: {problem} (looked at {path}). Set data.root in the config "
        f"or the {ROOT_ENV} environment variable to {_HOW.get(dataset, 'the data directory')}."
    )


@dataclass(frozen=True)
class Datasets:
    """Both splits of one dataset; ``image_size`` is the side of the (square) output images."""

    train: Dataset
    eval: Dataset
    num_classes: int
    image_size: int
    classes: list[str]


# ---------------------------------------------------------------- sources ---
# A source gives raw item j: ``image(j)`` (HWC uint8 array, PIL image, or a
# ready tensor for synthetic) and ``labels`` (int64, (N,)).

class PackedSource:
    """Encoded JPEGs in one .npz, validated on load and decoded per item."""

    def __init__(self, dataset: str, path: Path) -> None:
        if not path.is_file():
            raise _error(dataset, path, "file not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("jpeg", "offsets", "labels", "classes") if k not in z.files]
                if missing:
                    raise _error(dataset, path, f"missing key {missing[0]!r} (has {sorted(z.files)})")
                jpeg, offsets, labels, classes = (z[k] for k in ("jpeg", "offsets", "labels", "classes"))
        except DatasetError:
            raise
        except Exception as exc:  # zipfile.BadZipFile, OSError, ValueError, EOFError ...
            raise _error(dataset, path, f"not a readable .npz ({type(exc).__name__}: {exc})") from exc
        problem = _packed_problem(jpeg, offsets, labels, classes)
        if problem:
            raise _error(dataset, path, problem)
        self.path = path
        self.jpeg, self.offsets = jpeg, offsets.astype(np.int64)
        self.labels = labels.astype(np.int64)
        self.classes = [str(c) for c in classes]
        try:
            first = self.image(0)
        except Exception as exc:
            raise _error(dataset, path, f"item 0 is not a decodable image ({exc})") from exc
        if first.shape[0] != first.shape[1]:
            raise _error(dataset, path, f"images must be square, item 0 is {first.shape[:2]}")
        self.image_size = int(first.shape[0])

    def describe(self, j: int) -> str:
        return f"item {j} of {self.path}"

    def image(self, j: int) -> np.ndarray:
        """Decode item j to a ``(H, W, 3)`` uint8 array."""
        im = Image.open(io.BytesIO(self.jpeg[self.offsets[j]:self.offsets[j + 1]].tobytes()))
        # asarray decodes; convert() only for non-RGB files (it would copy an RGB image).
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def _packed_problem(jpeg: np.ndarray, offsets: np.ndarray, labels: np.ndarray,
                    classes: np.ndarray) -> str | None:
    if jpeg.ndim != 1 or jpeg.dtype != np.uint8:
        return f"'jpeg' must be 1-D uint8, got {jpeg.dtype} {jpeg.shape}"
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        return f"'labels' must be a non-empty 1-D integer array, got {labels.dtype} {labels.shape}"
    if offsets.shape != (labels.size + 1,) or not np.issubdtype(offsets.dtype, np.integer):
        return f"'offsets' must be integer of shape ({labels.size + 1},), got {offsets.dtype} {offsets.shape}"
    if offsets[0] != 0 or offsets[-1] != jpeg.size:
        return f"offsets[0] ({offsets[0]}) != 0 or offsets[-1] ({offsets[-1]}) != len(jpeg) ({jpeg.size})"
    if np.any(np.diff(offsets) <= 0):
        return "'offsets' must be strictly increasing (every image non-empty)"
    if classes.ndim != 1 or classes.size == 0 or classes.dtype.kind not in "US":
        return f"'classes' must be a non-empty 1-D string array, got {classes.dtype} {classes.shape}"
    if labels.min() < 0 or labels.max() >= classes.size:
        return f"labels must lie in [0, {classes.size}), got [{labels.min()}, {labels.max()}]"
    return None


class ArraySource:
    """Decoded images already in memory: ``data`` (N, H, W, 3) uint8 (torchvision CIFAR)."""

    def __init__(self, data: np.ndarray, labels: Sequence[int]) -> None:
        self.data, self.labels = data, np.asarray(labels, dtype=np.int64)

    def image(self, j: int) -> np.ndarray:
        return self.data[j]

    def describe(self, j: int) -> str:
        return f"item {j} of the in-memory array"


class FolderSource:
    """Image files on disk (ImageFolder samples), opened per item as RGB PIL images."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.paths = [p for p, _ in samples]
        self.labels = np.array([y for _, y in samples], dtype=np.int64)

    def image(self, j: int) -> Image.Image:
        with Image.open(self.paths[j]) as im:
            return im.convert("RGB")

    def describe(self, j: int) -> str:
        return self.paths[j]


class SyntheticSource:
    """Standard-normal float32 ``(3, size, size)`` images and uniform labels, fixed per index."""

    def __init__(self, n: int, num_classes: int, size: int, seed: int, split: int) -> None:
        self.key, self.size = (seed, _SYNTH_TAG, split), size
        self.labels = np.random.default_rng(self.key).integers(0, num_classes, n).astype(np.int64)

    def describe(self, j: int) -> str:
        return f"synthetic item {j}"

    def image(self, j: int) -> torch.Tensor:
        rng = np.random.default_rng([*self.key, j])
        return torch.from_numpy(rng.standard_normal((3, self.size, self.size), dtype=np.float32))


# ------------------------------------------------------------- transforms ---
# A transform maps (raw image, rng or None) -> float32 (3, H, W); rng=None is
# the eval path (no augmentation).

class _Normalize:
    """(H, W, 3) uint8 -> (3, H, W) float32, (x/255 - mean) / std per channel."""

    def __init__(self, stats: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
        mean, std = (np.asarray(s, dtype=np.float32) for s in stats)
        self.scale, self.shift = 1.0 / (255.0 * std), mean / std  # one multiply-add per pixel

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        x = img.transpose(2, 0, 1).astype(np.float32)  # astype makes it contiguous CHW
        x *= self.scale[:, None, None]
        x -= self.shift[:, None, None]
        return torch.from_numpy(x)


def random_crop_flip(img: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Random crop of the zero-padded image back to its size, then a random horizontal flip.

    Same as torchvision ``RandomCrop(size, padding=pad)`` + ``RandomHorizontalFlip()``
    on an (H, W, C) array, without materialising the padded image.
    """
    h, w = img.shape[:2]
    sy, sx = (int(v) - pad for v in rng.integers(0, 2 * pad + 1, size=2))
    out = np.zeros_like(img)
    # out[y, x] = img[y + sy, x + sx] where that lies inside the image, else 0.
    out[max(0, -sy):h - max(0, sy), max(0, -sx):w - max(0, sx)] = \
        img[max(0, sy):h + min(0, sy), max(0, sx):w + min(0, sx)]
    return out[:, ::-1] if rng.random() < 0.5 else out


class CifarTransform:
    """CIFAR-style: train = random crop (4-pixel zero padding) + flip; both = normalise."""

    def __init__(self, stats: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
        self.normalize = _Normalize(stats)

    def __call__(self, img: Any, rng: np.random.Generator | None) -> torch.Tensor:
        arr = np.asarray(img)
        return self.normalize(arr if rng is None else random_crop_flip(arr, rng))


class ImageNetTransform:
    """Train: RandomResizedCrop(size) + flip; eval: Resize(size*256/224) + CenterCrop(size)."""

    def __init__(self, size: int = 224) -> None:
        self.size, self.normalize = size, _Normalize(IMAGENET_STATS)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None) -> torch.Tensor:
        from torchvision.transforms import functional as F  # heavy import, only for imagenet

        if rng is None:
            img = F.center_crop(F.resize(img, round(self.size * 256 / 224)), [self.size, self.size])
        else:
            top, left, h, w = _resized_crop_box(img.width, img.height, rng)
            img = F.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
            if rng.random() < 0.5:
                img = F.hflip(img)
        return self.normalize(np.asarray(img))


# ---------------------------------------------------------------- dataset ---

class ImageDataset(Dataset):
    """A source, optionally restricted to ``indices``, with a seeded per-item transform.

    ``ds[i]`` -> ``(x, y)``: x float32 ``(3, H, W)``, y int. With ``augment``,
    the transform draws from ``default_rng([seed, epoch, i])``.

    An image that cannot be decoded raises :class:`DatasetError` naming the item and its source
    (file or packed item); with ``skip_bad=True`` the next decodable item of the split stands in,
    with a warning that names it and counts the skips of this process.
    """

    def __init__(self, source: Any, transform: Callable[[Any, np.random.Generator | None], torch.Tensor] | None,
                 *, augment: bool, seed: int, indices: np.ndarray | None = None, skip_bad: bool = False) -> None:
        self.source, self.transform = source, transform
        self.skip_bad, self.skipped = skip_bad, 0
        self.augment = augment and transform is not None
        self.seed, self.epoch = seed, 0
        self.indices = indices
        self.labels: np.ndarray = source.labels if indices is None else source.labels[indices]

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (>= 0)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.labels.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        for k in range(len(self)):  # k > 0 only when skipping bad images
            j = (i + k) % len(self)
            src = j if self.indices is None else int(self.indices[j])
            try:
                img = self.source.image(src)
            except (OSError, ValueError, SyntaxError) as exc:  # what Pillow raises for broken files
                where = self.source.describe(src)
                if not self.skip_bad:
                    raise DatasetError(f"image {j} ({where}) cannot be decoded: {type(exc).__name__}: {exc}; "
                                       "fix or remove it, or set data.skip_bad_images=true to skip such "
                                       "images") from exc
                self.skipped += 1
                print(f"warning: skipped undecodable image {j} ({where}): {exc} "
                      f"[{self.skipped} skipped in this process]", file=sys.stderr, flush=True)
                continue
            if self.transform is None:
                return img, int(self.labels[j])
            rng = np.random.default_rng([self.seed, self.epoch, j]) if self.augment else None
            return self.transform(img, rng), int(self.labels[j])
        raise DatasetError(f"no image of this split can be decoded ({len(self)} tried)")


# ---------------------------------------------------------------- loading ---

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
    if dataset not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASET_NAMES)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if dataset == "synthetic":
        nc, size = num_classes or 10, image_size or 32
        train_src: Any = SyntheticSource(synthetic_train, nc, size, seed, split=0)
        eval_src: Any = SyntheticSource(synthetic_eval, nc, size, seed, split=1)
        classes, transform = [f"class_{k}" for k in range(nc)], None
    else:
        path = _resolve_root(dataset, root, create=download and dataset.startswith("cifar"))
        if dataset == "shards":
            from trainer.shard_loader import shard_datasets  # imports this module

            return shard_datasets(path, augment=augment, seed=seed, train_subset=train_subset,
                                  eval_subset=eval_subset, image_size=image_size, num_classes=num_classes,
                                  decode=decode, shuffle_buffer=shuffle_buffer)
        if dataset == "packed":
            train_src, eval_src = (PackedSource(dataset, path / f) for f in ("train.npz", "test.npz"))
            if train_src.classes != eval_src.classes or train_src.image_size != eval_src.image_size:
                raise _error(dataset, path, "train.npz and test.npz differ in classes or image size")
            classes, size = train_src.classes, train_src.image_size
            transform: Any = CifarTransform(CIFAR10_STATS)
        elif dataset in ("cifar10", "cifar100"):
            (train_src, classes), (eval_src, _) = (_torchvision_cifar(dataset, path, t, download)
                                                   for t in (True, False))
            size = int(train_src.data.shape[1])
            transform = CifarTransform(CIFAR10_STATS if dataset == "cifar10" else CIFAR100_STATS)
        else:
            (train_src, classes), (eval_src, eval_classes) = (_image_folder(dataset, path / s)
                                                              for s in ("train", "val"))
            if classes != eval_classes:
                raise _error(dataset, path, "train/ and val/ hold different class folders")
            size = image_size or 224
            transform = ImageNetTransform(size)
        if image_size is not None and image_size != size:
            raise ValueError(f"image_size={image_size} but {dataset!r} images are {size}x{size}")
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"num_classes={num_classes} but {dataset!r} has {len(classes)} classes")
    return Datasets(
        train=ImageDataset(train_src, transform, augment=augment, seed=seed, skip_bad=skip_bad_images,
                           indices=_subset(len(train_src.labels), train_subset, seed, split=0)),
        eval=ImageDataset(eval_src, transform, augment=False, seed=seed, skip_bad=skip_bad_images,
                          indices=_subset(len(eval_src.labels), eval_subset, seed, split=1)),
        num_classes=len(classes), image_size=size, classes=classes,
    )


def data_root(root: str | None) -> str | None:
    """``root``, else ``$TDC_DATA_ROOT``, else None."""
    return root or os.environ.get(ROOT_ENV) or None


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def dataset_identity(dataset: str, root: str | None) -> str:
    """What the data is, for records: ``dataset`` names a storage format for ``packed`` (and ``shards``), so
    those are named by their content: ``cifar10`` for packed files with CIFAR-10's classes in its order,
    else the data directory's name. Never raises (a record must not stop a run)."""
    if dataset not in ("packed", "shards"):
        return dataset
    where = data_root(root)
    if not where:
        return dataset
    path = Path(where).expanduser()
    if dataset == "packed":
        try:
            with np.load(path / "train.npz", allow_pickle=False) as z:  # reads only the small classes array
                if tuple(str(c) for c in z["classes"]) == CIFAR10_CLASSES:
                    return "cifar10"
        except Exception:  # unreadable here: the run itself says why, with the file
            pass
    return path.resolve().name or dataset


def _resolve_root(dataset: str, root: str | None, *, create: bool) -> Path:
    root = data_root(root)
    if root is None:
        raise _error(dataset, None, f"no data root given and ${ROOT_ENV} is unset")
    path = Path(root).expanduser()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        raise _error(dataset, path, "directory not found")
    return path


def _torchvision_cifar(dataset: str, path: Path, train: bool, download: bool) -> tuple[ArraySource, list[str]]:
    from torchvision import datasets as tvd

    cls = tvd.CIFAR10 if dataset == "cifar10" else tvd.CIFAR100
    try:
        ds = cls(root=str(path), train=train, download=download)
    except Exception as exc:  # RuntimeError "not found or corrupted", URLError when offline
        raise _error(dataset, path / cls.base_folder, f"cannot load ({exc})") from exc
    return ArraySource(ds.data, ds.targets), list(ds.classes)


def _image_folder(dataset: str, path: Path) -> tuple[FolderSource, list[str]]:
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise _error(dataset, path, "directory not found")
    try:
        folder = ImageFolder(str(path))
    except Exception as exc:  # FileNotFoundError when no class folder / no image files
        raise _error(dataset, path, f"not an ImageFolder ({exc})") from exc
    return FolderSource(folder.samples), list(folder.classes)


def _subset(n: int, k: int, seed: int, split: int) -> np.ndarray | None:
    if k == 0:
        return None
    if not 0 < k <= n:
        raise ValueError(f"subset size must be in [0, {n}], got {k}")
    return np.sort(np.random.default_rng([seed, _SUBSET_TAG, split]).permutation(n)[:k])


# ---------------------------------------------------------------- loaders ---

class ShardSampler(Sampler[int]):
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

    Evaluation (neither set) uses ``ShardSampler``: indices[r::w], unpadded, so
    every item counts exactly once over the ranks.

    Workers are not persistent, so each ``iter(loader)`` forks them with the
    dataset epoch set by ``set_loader_epoch``.

    A ``shards`` split gets its own loader (trainer/shard_loader.py: same batch contract, uint8
    decode in the workers, normalised on ``device``; None = the current CUDA device, else CPU).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    if hasattr(ds, "loader"):  # a shards split (trainer.shard_loader.ShardSplit)
        return ds.loader(batch_size, rank=rank, world_size=world_size, shuffle=shuffle, drop_last=drop_last,
                         num_workers=num_workers, device=device)
    sampler: Sampler[int]
    if shuffle or drop_last:
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                     seed=seed, drop_last=drop_last)
    else:
        sampler = ShardSampler(len(ds), rank=rank, world_size=world_size)  # type: ignore[arg-type]
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
