"""What every dataset module shares: the data root, the error a missing dataset raises, the splits' container.

No other trainer module is imported here, so the dataset modules (sources,
shards, the registry) can all import it without a cycle.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

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

SUBSET_TAG, SYNTH_TAG = 0x5B5E7, 0x5A7  # keep seed streams of different uses apart
HOW = {
    "packed": "a directory holding train.npz and test.npz (layout: shared/data/cifar10/README.md)",
    "cifar10": "the torchvision CIFAR-10 directory, or set data.download=true when online",
    "cifar100": "the torchvision CIFAR-100 directory, or set data.download=true when online",
    "imagenet": "a directory holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG",
    "shards": "a directory holding index.json and the .tar shards written by `tdcompress pack`",
}


class DatasetError(Exception):
    """A dataset is missing or malformed; the message says where and how to fix it."""


def dataset_error(dataset: str, path: Path | str | None, problem: str) -> DatasetError:
    return DatasetError(
        f"dataset {dataset!r}: {problem} (looked at {path}). Set data.root in the config "
        f"or the {ROOT_ENV} environment variable to {HOW.get(dataset, 'the data directory')}."
    )


@dataclass(frozen=True)
class Datasets:
    """Both splits of one dataset; ``image_size`` is the side of the (square) output images."""

    train: Dataset
    eval: Dataset
    num_classes: int
    image_size: int
    classes: list[str]


def data_root(root: str | None) -> str | None:
    """``root``, else ``$TDC_DATA_ROOT``, else None."""
    return root or os.environ.get(ROOT_ENV) or None


def resolve_root(dataset: str, root: str | None, *, create: bool) -> Path:
    root = data_root(root)
    if root is None:
        raise dataset_error(dataset, None, f"no data root given and ${ROOT_ENV} is unset")
    path = Path(root).expanduser()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir():
        raise dataset_error(dataset, path, "directory not found")
    return path


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
