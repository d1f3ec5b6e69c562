"""`tdcompress pack` and the ``shards`` dataset on real ImageNet JPEGs (shared/data/imagenet-sample).

A temporary train/val tree: 34 sample images, each its own class (so a label names its image),
the 4 grayscale ones among them, plus a CMYK JPEG and PNG data behind a .JPEG name in train.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import IMAGENET_STATS, DatasetError, load_datasets, make_loader, set_loader_epoch
from trainer.data.shard_writer import INDEX, PLAN, PackError, PackOptions, pack, shard_name
from trainer.data.shards import Shard, ShardError, epoch_plan, read_shard, stream_slices

# TDC_IMAGENET_SAMPLE: another copy (the GPU bundle carries one; bench/gpu_bundle.py)
SAMPLE = Path(os.environ.get("TDC_IMAGENET_SAMPLE",
                             Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample" / "val"))
GRAY = ("n04008634", "n04090263", "n04372370", "n04532670")  # the sample's 4 mode-"L" JPEGs
OPTS = PackOptions(shard_bytes=600_000)  # ~6 images a shard: several shards, split at odd counts


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    if not SAMPLE.is_dir():
        pytest.fail(f"the ImageNet sample {SAMPLE} is required (see shared/data/imagenet-sample/README.md)",
                    pytrace=False)
    wnids = sorted(d.name for d in SAMPLE.iterdir())[:30] + list(GRAY)
    root = tmp_path_factory.mktemp("tree")
    for split in ("train", "val"):
        for w in wnids:
            (root / split / w).mkdir(parents=True)
            for f in (SAMPLE / w).iterdir():
                shutil.copyfile(f, root / split / w / f.name)
    src = next((SAMPLE / wnids[0]).iterdir())
    with Image.open(src) as im:
        im.convert("CMYK").save(root / "train" / wnids[0] / "cmyk.JPEG", "JPEG")
        im.save(root / "train" / wnids[1] / "png_data.JPEG", "PNG")
    return root


@pytest.fixture(scope="module")
def packed(tree: Path, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("shards")
    pack(tree, dst, OPTS, workers=2, progress=lambda line: None)
    return dst


def _samples(dst: Path, split: str) -> list[tuple[str, bytes, int]]:
    """(key, stored bytes, label) of every sample of ``split``, in shard order, read with the tarfile module."""
    out = []
    for rec in json.loads((dst / INDEX).read_text())["splits"][split]["shards"]:
        with tarfile.open(dst / rec["name"]) as tf:
            members = tf.getmembers()
            for jpg, cls in zip(members[::2], members[1::2]):
                assert jpg.name.endswith(".jpg") and cls.name == jpg.name[:-4] + ".cls"
                out.append((jpg.name[:-4], tf.extractfile(jpg).read(), int(tf.extractfile(cls).read())))
    return out


def _pixels(x: torch.Tensor) -> np.ndarray:
    """Undo the normalisation of a (B, 3, H, W) batch: (B, H, W, 3) pixel levels 0..255."""
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in IMAGENET_STATS)
    return ((x * std + mean) * 255).permute(0, 2, 3, 1).numpy()


def test_pack_stores_every_image_once_with_its_label(tree: Path, packed: Path) -> None:
    plan = json.loads((packed / PLAN).read_text())
    index = json.loads((packed / INDEX).read_text())
    assert index["classes"] == sorted(d.name for d in (tree / "train").iterdir())
    for split, n in (("train", 36), ("val", 34)):
        got = _samples(packed, split)
        assert len(got) == n == index["splits"][split]["samples"]
        assert sum(s["samples"] for s in index["splits"][split]["shards"]) == n
        assert len(index["splits"][split]["shards"]) >= 4
        files = plan["files"][split]  # the pack-time order: key = position in it
        assert sorted(int(k) for k, _, _ in got) == list(range(n))
        for key, data, label in got:
            rel, y = files[int(key)].rsplit(":", 1)
            assert label == int(y) == index["classes"].index(Path(rel).parent.name)
            src = (tree / rel).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                assert (im.format, im.mode) == ("JPEG", "RGB")  # grayscale, CMYK and PNG data all converted
                if Path(rel).parent.name in GRAY:
                    rgb = np.asarray(im)
                    assert rgb.shape[2] == 3 and np.array_equal(rgb[..., 0], rgb[..., 2])
            with Image.open(tree / rel) as im:
                unchanged = im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 500
            assert (data == src) == unchanged  # small RGB JPEGs stored byte for byte, the rest re-encoded


def test_loader_reads_every_val_image_once_with_pillow_pixels(packed: Path) -> None:
    from torchvision.transforms import functional as F

    sets = load_datasets("shards", str(packed), seed=0)
    assert sets.num_classes == 34 and len(sets.eval) == 34 and sets.image_size == 224
    loader = make_loader(sets.eval, 8, rank=0, world_size=1, shuffle=False, seed=0, drop_last=False, num_workers=0)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (34, 3, 224, 224) and x.dtype == torch.float32 and len(loader) == 5
    ref = [(np.asarray(F.center_crop(F.resize(Image.open(io.BytesIO(data)).convert("RGB"), 256), [224, 224])),
            label) for _, data, label in _samples(packed, "val")]
    assert y.tolist() == [label for _, label in ref]
    # Normalised on the device and undone here: equal to Pillow + torchvision up to float rounding.
    np.testing.assert_allclose(_pixels(x), np.stack([r for r, _ in ref]).astype(np.float32), atol=2e-3)


def test_unreadable_files_are_all_named_or_skipped(tree: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tree / "val", bad / "val")
    victim = next((bad / "val" / GRAY[0]).iterdir())
    victim.write_bytes(victim.read_bytes()[:3000])  # truncated JPEG
    (bad / "val" / GRAY[1] / "garbage.JPEG").write_bytes(b"not an image at all")
    with pytest.raises(PackError) as err:
        pack(bad, tmp_path / "out", OPTS, progress=lambda line: None)
    assert str(victim) in str(err.value) and "garbage.JPEG" in str(err.value) and "--skip-bad" in str(err.value)
    assert not (tmp_path / "out" / INDEX).exists()
    lines: list[str] = []
    index = pack(bad, tmp_path / "out", OPTS, skip_bad=True, progress=lines.append)
    assert index["splits"]["val"]["samples"] == 33 and index["splits"]["val"]["skipped"] == 2
    assert any("2 unreadable skipped" in line for line in lines)


def test_missing_index_and_truncated_shard_are_named(packed: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=str(tmp_path / INDEX)):
        load_datasets("shards", str(tmp_path))
    copy = tmp_path / "copy"
    shutil.copytree(packed, copy)
    victim = copy / shard_name("train", 1)
    victim.write_bytes(victim.read_bytes()[:200_000])
    with pytest.raises(DatasetError, match=f"{victim}.*truncated"):
        load_datasets("shards", str(copy))
    # Past the size check (a shard cut where nobody compared sizes): the reader names it too.
    n = json.loads((copy / INDEX).read_text())["splits"]["train"]["shards"][1]["samples"]
    with pytest.raises(ShardError, match=str(victim)):
        list(read_shard(Shard(victim, n, 0), 0, n))


def test_interrupted_pack_resumes_to_the_same_shards(tree: Path, packed: Path, tmp_path: Path) -> None:
    dst = tmp_path / "resumed"

    def stop_after_two(line: str) -> None:
        if line.startswith("train: " + shard_name("train", 1)):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(tree, dst, OPTS, progress=stop_after_two)
    assert not (dst / INDEX).exists()
    kept = {p.name: p.stat().st_mtime_ns for p in dst.glob("*.tar")}
    assert sorted(kept) == [shard_name("train", 0), shard_name("train", 1)]
    lines: list[str] = []
    pack(tree, dst, OPTS, workers=2, progress=lines.append)
    assert any("2 finished shards kept" in line for line in lines)
    assert {n: (dst / n).stat().st_mtime_ns for n in kept} == kept  # not rewritten
    shards = sorted(p.name for p in packed.glob("*.tar"))
    assert sorted(p.name for p in dst.glob("*.tar")) == shards
    for name in shards:
        assert (dst / name).read_bytes() == (packed / name).read_bytes(), name
    assert (dst / INDEX).read_text() == (packed / INDEX).read_text()
    with pytest.raises(PackError, match="other options"):
        pack(tree, dst, PackOptions(shard_bytes=700_000), progress=lambda line: None)


@pytest.mark.parametrize("counts", [[5, 7, 3, 9, 1], [6], [4, 4, 4, 4]])
def test_epoch_plan_partitions_the_used_stream(counts: list[int]) -> None:
    n = sum(counts)
    for world, workers, batch in [(1, 1, 2), (2, 2, 2), (3, 2, 1), (2, 3, 3)]:
        per_rank = n // (world * batch)
        spans = []
        for rank in range(world):
            mine = [epoch_plan(counts, epoch=3, seed=1, rank=rank, world=world, worker=w, workers=workers,
                               batch=batch, train=True) for w in range(workers)]
            assert sum(e - s for _, s, e in mine) == per_rank * batch  # equal batches on every rank
            spans += [(s, e) for _, s, e in mine]
            order = mine[0][0]
            for _, s, e in mine:
                assert sum(h - lo for _, lo, h in stream_slices(counts, order, s, e)) == e - s
        covered = sorted(p for s, e in spans for p in range(s, e))
        assert covered == list(range(world * per_rank * batch))
        ev = [epoch_plan(counts, epoch=0, seed=1, rank=r, world=world, worker=w, workers=workers, batch=batch,
                         train=False) for r in range(world) for w in range(workers)]
        assert sorted(p for _, s, e in ev for p in range(s, e)) == list(range(n))  # eval: all, unpadded


@pytest.fixture(scope="module")
def unique(tree: Path, tmp_path_factory) -> Path:
    """Shards whose train split is the val images: every label names one image."""
    root = tmp_path_factory.mktemp("unique")
    (root / "src").mkdir()
    for split in ("train", "val"):
        (root / "src" / split).symlink_to(tree / "val")
    pack(root / "src", root / "out", OPTS, progress=lambda line: None)
    return root / "out"


def _epoch(sets, rank: int, epoch: int, skip: int = 0) -> list[list[int]]:
    loader = make_loader(sets.train, 4, rank=rank, world_size=2, shuffle=True, seed=5, drop_last=True, num_workers=2)
    loader.set_epoch(epoch, skip_batches=skip) if skip else set_loader_epoch(loader, epoch)
    batches = [y.tolist() for x, y in loader]
    assert skip or len(batches) == len(loader)
    return batches


def test_two_ranks_two_workers_cover_each_sample_once_and_resume(unique: Path) -> None:
    sets = load_datasets("shards", str(unique), seed=5, image_size=32)
    orders = []
    for epoch in (0, 1):
        per_rank = [_epoch(sets, rank, epoch) for rank in (0, 1)]
        assert [len(b) for b in per_rank] == [4, 4]  # 34 // (2 ranks x batch 4) full batches each; 2 dropped
        seen = [y for b in per_rank for batch in b for y in batch]
        assert len(seen) == 32 == len(set(seen))  # each used sample exactly once over ranks and workers
        orders.append(seen)
    assert orders[0] != orders[1]
    # Resume after 3 of rank 0's 4 batches of epoch 1: the rest, exactly as the uninterrupted epoch had it.
    full = _epoch(sets, 0, 1)
    assert full == _epoch(sets, 0, 1)  # deterministic per (seed, epoch)
    assert _epoch(sets, 0, 1, skip=3) == full[3:]
    assert _epoch(sets, 0, 1, skip=2) == full[2:]


def test_decode_setting_is_checked() -> None:
    from trainer.config import DataConfig

    with pytest.raises(ValueError, match="decode: must be one of cpu, gpu"):
        DataConfig(dataset="shards", decode="tpu")
    with pytest.raises(ValueError, match="decode: 'gpu' decodes the tar shards"):
        DataConfig(dataset="imagenet", decode="gpu")
    with pytest.raises(ValueError, match="shuffle_buffer"):
        DataConfig(dataset="shards", shuffle_buffer=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_matches_cpu_decode(packed: Path) -> None:
    sets = load_datasets("shards", str(packed), seed=0, decode="gpu")
    cpu = load_datasets("shards", str(packed), seed=0)
    kw = dict(rank=0, world_size=1, shuffle=False, seed=0, drop_last=False)
    (xg, yg), (xc, yc) = (next(iter(make_loader(s.eval, 8, **kw))) for s in (sets, cpu))
    assert xg.is_cuda and torch.equal(yg, yc)
    # Crop arithmetic and resize filters differ slightly (nvJPEG vs libjpeg, torch vs Pillow): close, not equal.
    assert (xg.cpu() - xc).abs().mean() < 0.15


@pytest.mark.ray
@pytest.mark.slow
def test_resnet18_trains_from_shards_through_ray_and_deepspeed(unique: Path, tmp_path: Path) -> None:
    """Two Ray workers (gloo, DeepSpeed), each reading its share of the shards: a few steps, then evaluation."""
    import ray
    from conftest import tiny_config

    from cluster.config import ClusterConfig
    from cluster.ray_runtime import ensure_ray
    from launcher.run import pipeline
    from trainer.checkpoints import files as ckpt

    cfg = tiny_config(tmp_path, unique, overrides=[
        "model.name=resnet18", "data.dataset=shards", f"data.root={unique}", "data.train_subset=0",
        "data.eval_subset=8", "data.batch_size=4", "data.eval_batch_size=8", "data.loader_workers=1",
        "optim.lr=0.01", "cluster.backend=ray", "cluster.num_workers=2",
        "phases=[{kind: pretrain, epochs: 1, steps_per_epoch: 2}]"])
    ensure_ray(ClusterConfig())
    try:
        info = pipeline.run(cfg)
    finally:
        ray.shutdown()
    meta = ckpt.read_meta(ckpt.latest_checkpoint(info.dir / "checkpoints"))
    assert (meta["dataset"], meta["num_classes"], meta["image_size"], meta["phase_done"]) == ("shards", 34, 224, True)
