"""Image datasets read item by item: sources (packed JPEGs, arrays, image folders, synthetic), transforms, subsets.

A source gives raw item ``j``; :class:`ImageDataset` applies a seeded per-item
transform, so item ``i`` at epoch ``e`` is the same tensor in any process.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from trainer.data.common import IMAGENET_STATS, SUBSET_TAG, SYNTH_TAG, DatasetError, dataset_error
from trainer.data.decode import resized_crop_box

# ---------------------------------------------------------------- sources ---
# A source gives raw item j: ``image(j)`` (HWC uint8 array, PIL image, or a
# ready tensor for synthetic) and ``labels`` (int64, (N,)).

class PackedSource:
    """Encoded JPEGs in one .npz, validated on load and decoded per item."""

    def __init__(self, dataset: str, path: Path) -> None:
        if not path.is_file():
            raise dataset_error(dataset, path, "file not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("jpeg", "offsets", "labels", "classes") if k not in z.files]
                if missing:
                    raise dataset_error(dataset, path, f"missing key {missing[0]!r} (has {sorted(z.files)})")
                jpeg, offsets, labels, classes = (z[k] for k in ("jpeg", "offsets", "labels", "classes"))
        except DatasetError:
            raise
        except Exception as exc:  # zipfile.BadZipFile, OSError, ValueError, EOFError ...
            raise dataset_error(dataset, path, f"not a readable .npz ({type(exc).__name__}: {exc})") from exc
        problem = _packed_problem(jpeg, offsets, labels, classes)
        if problem:
            raise dataset_error(dataset, path, problem)
        self.path = path
        self.jpeg, self.offsets = jpeg, offsets.astype(np.int64)
        self.labels = labels.astype(np.int64)
        self.classes = [str(c) for c in classes]
        try:
            first = self.image(0)
        except Exception as exc:
            raise dataset_error(dataset, path, f"item 0 is not a decodable image ({exc})") from exc
        if first.shape[0] != first.shape[1]:
            raise dataset_error(dataset, path, f"images must be square, item 0 is {first.shape[:2]}")
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
        self.key, self.size = (seed, SYNTH_TAG, split), size
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
            top, left, h, w = resized_crop_box(img.width, img.height, rng)
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


def torchvision_cifar(dataset: str, path: Path, train: bool, download: bool) -> tuple[ArraySource, list[str]]:
    from torchvision import datasets as tvd

    cls = tvd.CIFAR10 if dataset == "cifar10" else tvd.CIFAR100
    try:
        ds = cls(root=str(path), train=train, download=download)
    except Exception as exc:  # RuntimeError "not found or corrupted", URLError when offline
        raise dataset_error(dataset, path / cls.base_folder, f"cannot load ({exc})") from exc
    return ArraySource(ds.data, ds.targets), list(ds.classes)


def image_folder(dataset: str, path: Path) -> tuple[FolderSource, list[str]]:
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise dataset_error(dataset, path, "directory not found")
    try:
        folder = ImageFolder(str(path))
    except Exception as exc:  # FileNotFoundError when no class folder / no image files
        raise dataset_error(dataset, path, f"not an ImageFolder ({exc})") from exc
    return FolderSource(folder.samples), list(folder.classes)


def subset(n: int, k: int, seed: int, split: int) -> np.ndarray | None:
    if k == 0:
        return None
    if not 0 < k <= n:
        raise ValueError(f"subset size must be in [0, {n}], got {k}")
    return np.sort(np.random.default_rng([seed, SUBSET_TAG, split]).permutation(n)[:k])
