"""Datasets and loaders: packed CIFAR-10, augmentation determinism, subsets, errors, sharding."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from trainer.data import (
    CIFAR10_STATS,
    DatasetError,
    Datasets,
    StridedEvalSampler,
    load_datasets,
    make_loader,
    random_crop_flip,
    set_loader_epoch,
)

MEAN, STD = (torch.tensor(s).view(3, 1, 1) for s in CIFAR10_STATS)


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Undo the normalisation: (3, H, W) float -> (H, W, 3) float pixel levels 0..255."""
    return ((x * STD + MEAN) * 255).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def packed(cifar_root: Path) -> Datasets:
    return load_datasets("packed", str(cifar_root), seed=0)


# ------------------------------------------------------------ packed data ---

def test_packed_counts(packed: Datasets) -> None:
    assert (len(packed.train), len(packed.eval)) == (50_000, 10_000)
    assert packed.num_classes == 10 and packed.image_size == 32
    assert packed.classes[:3] == ["airplane", "automobile", "bird"] and packed.classes[-1] == "truck"
    # Labels come from the npz, nothing is decoded.
    assert np.bincount(packed.train.labels).tolist() == [5000] * 10
    assert np.bincount(packed.eval.labels).tolist() == [1000] * 10


def test_packed_item(packed: Datasets) -> None:
    x, y = packed.train[12_345]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert isinstance(y, int) and y == 2  # rows sorted by class: 10,000..14,999 are birds
    x, y = packed.eval[0]
    assert y == 0  # test rows are sorted by class, row 0 is an airplane
    # Normalised pixels of a real image: roughly zero-mean, unit-scale.
    assert -3 < x.min() < 0 < x.max() < 3


def test_eval_decodes_close_to_lossless_originals(packed: Datasets, cifar_root: Path) -> None:
    ref = np.load(cifar_root / "test_first20_original.npz")
    for img, pos, label in zip(ref["images"], ref["npz_pos"], ref["labels"]):
        x, y = packed.eval[int(pos)]
        assert y == label
        # README: JPEG q75 vs original, mean abs error ~6 levels; catches channel/normalisation mix-ups.
        assert np.abs(to_pixels(x) - img.astype(np.float32)).mean() < 12


def test_eval_items_unaugmented_and_deterministic(packed: Datasets) -> None:
    raw = packed.eval.source.image(7).astype(np.float32)
    a = packed.eval[7][0]
    packed.eval.set_epoch(3)
    try:
        assert torch.equal(packed.eval[7][0], a)
    finally:
        packed.eval.set_epoch(0)
    assert np.abs(to_pixels(a) - raw).max() < 1e-3


def test_no_augment_train_is_plain(cifar_root: Path) -> None:
    d = load_datasets("packed", str(cifar_root), augment=False)
    d.train.set_epoch(5)
    x = d.train[100][0]
    assert np.abs(to_pixels(x) - d.train.source.image(100)).max() < 1e-3


# ----------------------------------------------------------- augmentation ---

def test_augmentation_deterministic_per_seed_epoch_index(packed: Datasets, cifar_root: Path) -> None:
    other = load_datasets("packed", str(cifar_root), seed=0).train  # another "process"
    idx = list(range(0, 50_000, 2_500))  # 20 items, two per class
    for ds in (packed.train, other):
        ds.set_epoch(2)
    first = [packed.train[i][0] for i in idx]
    assert all(torch.equal(other[i][0], x) for i, x in zip(reversed(idx), reversed(first)))
    other.set_epoch(3)
    changed = sum(not torch.equal(other[i][0], x) for i, x in zip(idx, first))
    assert changed >= 16  # identical draws have probability 1/162 per item
    reseeded = load_datasets("packed", str(cifar_root), seed=1).train
    reseeded.set_epoch(2)
    assert sum(not torch.equal(reseeded[i][0], x) for i, x in zip(idx, first)) >= 16
    packed.train.set_epoch(0)


def test_augmented_item_is_crop_and_flip_of_image(packed: Datasets) -> None:
    raw = packed.train.source.image(4321).astype(np.float32)
    aug = to_pixels(packed.train[4321][0])
    padded = np.pad(raw, ((4, 4), (4, 4), (0, 0)))
    crops = [c for dy in range(9) for dx in range(9) for c in
             (padded[dy:dy + 32, dx:dx + 32], padded[dy:dy + 32, dx:dx + 32][:, ::-1])]
    assert min(np.abs(c - aug).max() for c in crops) < 1e-3


def test_random_crop_flip_matches_padded_reference() -> None:
    img = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    padded = np.pad(img, ((2, 2), (2, 2), (0, 0)))
    for k in range(60):
        rng, ref_rng = np.random.default_rng(k), np.random.default_rng(k)
        dy, dx = ref_rng.integers(0, 5, size=2)
        ref = padded[dy:dy + 6, dx:dx + 5]
        ref = ref[:, ::-1] if ref_rng.random() < 0.5 else ref
        assert np.array_equal(random_crop_flip(img, rng, pad=2), ref)


# ---------------------------------------------------------------- subsets ---

def test_subset_is_seeded_and_mixed(cifar_root: Path) -> None:
    a = load_datasets("packed", str(cifar_root), train_subset=1000, eval_subset=300, seed=4)
    b = load_datasets("packed", str(cifar_root), train_subset=1000, eval_subset=300, seed=4)
    assert (len(a.train), len(a.eval)) == (1000, 300)
    assert len(np.unique(a.train.labels)) >= 8 and len(np.unique(a.eval.labels)) >= 8
    assert np.array_equal(a.train.indices, b.train.indices)
    assert len(np.unique(a.train.indices)) == 1000
    assert a.train[10][1] == int(a.train.source.labels[a.train.indices[10]])
    with pytest.raises(ValueError):
        load_datasets("packed", str(cifar_root), eval_subset=10_001)


# ----------------------------------------------------------------- errors ---

def write_packed(root: Path, images: list[bytes], labels: list[int], /, **override: np.ndarray) -> None:
    """Write a valid packed train.npz/test.npz pair, with keys replaced or removed (value None)."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        "jpeg": np.frombuffer(b"".join(images), np.uint8),
        "offsets": np.cumsum([0] + [len(b) for b in images]).astype(np.int64),
        "labels": np.array(labels, np.uint8),
        "classes": np.array(["a", "b"]),
    }
    arrays.update(override)
    for split in ("train", "test"):
        np.savez_compressed(root / f"{split}.npz", **{k: v for k, v in arrays.items() if v is not None})


def jpegs(n: int) -> list[bytes]:
    out = []
    for k in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 30 * k, np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def test_tiny_packed_set_loads(tmp_path: Path) -> None:
    write_packed(tmp_path, jpegs(3), [0, 1, 1])
    d = load_datasets("packed", str(tmp_path))
    assert (len(d.train), d.num_classes, d.image_size, d.classes) == (3, 2, 8, ["a", "b"])
    assert d.train[2][0].shape == (3, 8, 8)


@pytest.mark.parametrize("override, needle", [
    ({"offsets": None}, "missing key 'offsets'"),
    ({"offsets": np.array([0, 5, 9, 12])}, "offsets[-1]"),
    ({"labels": np.array([0, 1, 2], np.uint8)}, "labels must lie in [0, 2)"),
    ({"jpeg": np.zeros(4, np.float32)}, "'jpeg' must be 1-D uint8"),
])
def test_malformed_packed(tmp_path: Path, override: dict, needle: str) -> None:
    write_packed(tmp_path, jpegs(3), [0, 1, 1], **override)
    with pytest.raises(DatasetError) as err:
        load_datasets("packed", str(tmp_path))
    assert needle in str(err.value) and str(tmp_path / "train.npz") in str(err.value)


def test_corrupt_npz(tmp_path: Path) -> None:
    (tmp_path / "train.npz").write_bytes(b"this is not a zip file")
    (tmp_path / "test.npz").write_bytes(b"nor this")
    with pytest.raises(DatasetError, match="not a readable .npz") as err:
        load_datasets("packed", str(tmp_path))
    assert str(tmp_path / "train.npz") in str(err.value) and "TDC_DATA_ROOT" in str(err.value)


def test_undecodable_jpeg(tmp_path: Path) -> None:
    write_packed(tmp_path, [b"garbage!", b"junk"], [0, 1])
    with pytest.raises(DatasetError, match="not a decodable image"):
        load_datasets("packed", str(tmp_path))


def test_missing_file_and_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_packed(tmp_path, jpegs(2), [0, 1])
    (tmp_path / "test.npz").unlink()
    with pytest.raises(DatasetError, match="file not found") as err:
        load_datasets("packed", str(tmp_path))
    assert str(tmp_path / "test.npz") in str(err.value)
    with pytest.raises(DatasetError, match="directory not found") as err:
        load_datasets("packed", str(tmp_path / "nowhere"))
    assert "data.root" in str(err.value) and str(tmp_path / "nowhere") in str(err.value)
    monkeypatch.delenv("TDC_DATA_ROOT", raising=False)
    with pytest.raises(DatasetError, match="TDC_DATA_ROOT"):
        load_datasets("packed", None)
    monkeypatch.setenv("TDC_DATA_ROOT", str(tmp_path / "elsewhere"))
    with pytest.raises(DatasetError, match="elsewhere"):
        load_datasets("packed", None)


def test_missing_torchvision_cifar_and_imagenet(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="data.download=true") as err:
        load_datasets("cifar10", str(tmp_path))
    assert "cifar-10-batches-py" in str(err.value)
    with pytest.raises(DatasetError, match="cifar100"):
        load_datasets("cifar100", str(tmp_path))
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="imagenet") as err:
        load_datasets("imagenet", str(tmp_path))
    assert str(tmp_path / "train") in str(err.value)


def test_bad_arguments(cifar_root: Path) -> None:
    with pytest.raises(ValueError, match="synthetic"):
        load_datasets("mnist", None)
    with pytest.raises(ValueError, match="num_classes"):
        load_datasets("packed", str(cifar_root), num_classes=100)
    with pytest.raises(ValueError, match="image_size"):
        load_datasets("packed", str(cifar_root), image_size=224)


# --------------------------------------------------- imagenet + synthetic ---

def test_imagenet_folder_layout(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    d = load_datasets("imagenet", str(tmp_path), image_size=24, seed=3)
    assert (len(d.train), len(d.eval), d.classes, d.image_size) == (4, 4, ["n01", "n02"], 24)
    x, y = d.train[3]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and y == 1
    assert torch.equal(load_datasets("imagenet", str(tmp_path), image_size=24, seed=3).train[3][0], x)
    first = d.eval[0][0]
    d.eval.set_epoch(2)  # eval items are not augmented: the epoch changes nothing
    assert first.shape == (3, 24, 24) and torch.equal(d.eval[0][0], first)


def test_synthetic_deterministic() -> None:
    a = load_datasets("synthetic", None, seed=5, synthetic_train=64, synthetic_eval=16,
                      image_size=16, num_classes=5)
    b = load_datasets("synthetic", None, seed=5, synthetic_train=64, synthetic_eval=16,
                      image_size=16, num_classes=5)
    assert (len(a.train), len(a.eval), a.num_classes, a.image_size) == (64, 16, 5, 16)
    x, y = a.train[7]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < 5
    assert torch.equal(b.train[7][0], x) and b.train[7][1] == y
    a.train.set_epoch(4)
    assert torch.equal(a.train[7][0], x)  # fixed per index, no augmentation
    assert not torch.equal(a.train[8][0], x) and not torch.equal(a.eval[7][0], x)
    c = load_datasets("synthetic", None, seed=6, synthetic_train=64, image_size=16, num_classes=5)
    assert not torch.equal(c.train[7][0], x)
    d = load_datasets("synthetic", None)
    assert (d.num_classes, d.image_size, len(d.train), len(d.eval)) == (10, 32, 1024, 256)


# ---------------------------------------------------------------- loaders ---

def test_two_rank_batches_union_to_one_rank_double_batch(cifar_root: Path) -> None:
    ds = load_datasets("packed", str(cifar_root), train_subset=1000, seed=0).train
    b, seed = 16, 11
    one = make_loader(ds, 2 * b, rank=0, world_size=1, shuffle=True, seed=seed, drop_last=True)
    ranks = [make_loader(ds, b, rank=r, world_size=2, shuffle=True, seed=seed, drop_last=True)
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) == 1000 // (2 * b)
    for loader in (one, *ranks):
        set_loader_epoch(loader, 1)
    checked = 0
    for (x1, y1), (xa, ya), (xb, yb) in itertools.islice(zip(one, *ranks), 3):
        # Rank r holds positions r, r+2, ... of the one-rank batch: same items, same augmentation.
        assert x1.shape == (2 * b, 3, 32, 32) and y1.dtype == torch.int64
        assert torch.equal(x1[0::2], xa) and torch.equal(x1[1::2], xb)
        assert torch.equal(y1[0::2], ya) and torch.equal(y1[1::2], yb)
        checked += 1
    assert checked == 3


def test_epoch_changes_order_and_reaches_workers(cifar_root: Path) -> None:
    ds = load_datasets("packed", str(cifar_root), train_subset=64, seed=0).train
    plain = make_loader(ds, 16, rank=0, world_size=1, shuffle=True, seed=0, drop_last=True)
    workers = make_loader(ds, 16, rank=0, world_size=1, shuffle=True, seed=0, drop_last=True,
                          num_workers=2)
    set_loader_epoch(plain, 0)
    x0, y0 = next(iter(plain))
    for loader in (plain, workers):
        set_loader_epoch(loader, 1)
    (xp, yp), (xw, yw) = next(iter(plain)), next(iter(workers))
    assert torch.equal(xp, xw) and torch.equal(yp, yw)  # worker processes see epoch 1
    assert not torch.equal(x0, xp)


@pytest.mark.parametrize("n, world", [(10, 3), (7, 2), (2, 4)])
def test_eval_sharding_is_exact(n: int, world: int) -> None:
    seen = [i for r in range(world) for i in StridedEvalSampler(n, rank=r, world_size=world)]
    assert sorted(seen) == list(range(n))
    ds = load_datasets("synthetic", None, synthetic_eval=n, image_size=4).eval
    total = 0
    for r in range(world):
        loader = make_loader(ds, 3, rank=r, world_size=world, shuffle=False, seed=0, drop_last=False)
        total += sum(len(y) for _, y in loader)
    assert total == n  # no padding: summed counts are exact


def test_make_loader_rejects_bad_rank(packed: Datasets) -> None:
    with pytest.raises(ValueError, match="rank"):
        make_loader(packed.eval, 8, rank=2, world_size=2, shuffle=False, seed=0, drop_last=False)
