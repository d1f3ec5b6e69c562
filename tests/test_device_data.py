"""data.device_cache: splits decoded once, kept on the device, augmented and normalised there (CPU tests)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from launcher.config import ConfigError
from launcher.run import pipeline
from trainer.data import load_datasets, make_loader, random_crop_flip, set_loader_epoch
from trainer.data.device_cache import DeviceDataset, DeviceLoader, crop_flip, make_device_loader
from trainer.tracking import tracker as tracking

PAD, SIDE = 4, 32
CHI2_8DOF_P001 = 26.12  # chi-square quantile, 8 degrees of freedom, p = 0.001


def _batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    set_loader_epoch(loader, epoch)
    return list(loader)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_unaugmented_batches_equal_the_cpu_loader(cifar_root, split):
    """Same samplers, same decode, the CPU transform's normalisation constants: bit-identical batches."""
    sets = load_datasets("packed", str(cifar_root), augment=False, seed=3, train_subset=300, eval_subset=101)
    ds, train = (sets.train, True) if split == "train" else (sets.eval, False)
    kw = dict(rank=1, world_size=2, shuffle=train, seed=3, drop_last=train)
    cpu = make_loader(ds, 32, **kw)
    dev = make_device_loader(ds, 32, device=torch.device("cpu"), **kw)
    assert len(dev) == len(cpu)
    a, b = _batches(cpu, 2), _batches(dev, 2)
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        assert xb.dtype == torch.float32 and xb.shape == xa.shape
        assert torch.equal(xa, xb.contiguous())


def _ids_dataset(n: int, augment: bool) -> DeviceDataset:
    """n blank images whose label is their index."""
    return DeviceDataset(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.arange(n), scale=np.ones(3),
                         shift=np.zeros(3), augment=augment, seed=0)


def test_every_image_once_per_epoch():
    from torch.utils.data.distributed import DistributedSampler

    from trainer.data import StridedEvalSampler

    n, world, batch = 96, 2, 8  # divisible: training drops nothing
    data = _ids_dataset(n, augment=True)
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            loader = DeviceLoader(data, DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0,
                                                           drop_last=True), batch, drop_last=True, rank=rank)
            seen += [y for _, ys in _batches(loader, epoch) for y in ys.tolist()]
        assert sorted(seen) == list(range(n))
        orders.append(seen)
    assert orders[0] != orders[1]  # a new shuffle each epoch
    odd = _ids_dataset(37, augment=False)  # evaluation: unpadded shards, a short last batch
    seen = [y for rank in range(3) for _, ys in
            DeviceLoader(odd, StridedEvalSampler(37, rank=rank, world_size=3), 5, drop_last=False, rank=rank)
            for y in ys.tolist()]
    assert sorted(seen) == list(range(37))


def _coordinate_image() -> np.ndarray:
    """(H, W, 3) uint8: channel 0 = row + 1, channel 1 = column + 1, channel 2 = 255 (zero padding stays 0)."""
    y, x = np.mgrid[:SIDE, :SIDE]
    return np.stack([y + 1, x + 1, np.full_like(y, 255)], axis=-1).astype(np.uint8)


def _draws(out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recover each augmented coordinate image's (dy, dx, flipped) from its centre pixels: out (B, H, W, 3)."""
    c = SIDE // 2  # always inside the source image, since |offset| <= PAD
    flipped = out[:, c, c + 1, 1].astype(int) - out[:, c, c, 1].astype(int) == -1
    dy = out[:, c, c, 0].astype(int) - 1 - c
    dx = np.where(flipped, out[:, c, c, 1].astype(int) - 1 - (SIDE - 1 - c), out[:, c, c, 1].astype(int) - 1 - c)
    return dy, dx, flipped


def _check_uniform(dy: np.ndarray, dx: np.ndarray, flipped: np.ndarray) -> None:
    n = dy.size
    for d in (dy, dx):
        assert d.min() == -PAD and d.max() == PAD
        counts = np.bincount(d + PAD, minlength=2 * PAD + 1)
        expected = n / (2 * PAD + 1)
        assert ((counts - expected) ** 2 / expected).sum() < CHI2_8DOF_P001, counts
    assert abs(flipped.mean() - 0.5) < 4 * 0.5 / np.sqrt(n)  # 4 standard errors


class _FixedRng:
    """Replays given draws through numpy's Generator interface (integers, random), as random_crop_flip calls it."""

    def __init__(self, dy: int, dx: int, flip: bool) -> None:
        self.dy, self.dx, self.flip = dy, dx, flip

    def integers(self, low: int, high: int, size: int) -> np.ndarray:
        return np.array([self.dy + PAD, self.dx + PAD])

    def random(self) -> float:
        return 0.25 if self.flip else 0.75


def test_device_augmentation_matches_the_cpu_distribution(cifar_root):
    n = 18_000
    img = _coordinate_image()
    gen = torch.Generator().manual_seed(0)
    batch = torch.from_numpy(img).permute(2, 0, 1)[None].expand(n, -1, -1, -1)
    dev = crop_flip(batch, gen, PAD).permute(0, 2, 3, 1).numpy()
    dev_draws = _draws(dev)
    _check_uniform(*dev_draws)
    cpu = np.stack([random_crop_flip(img, np.random.default_rng([0, 0, i]), PAD) for i in range(n)])
    _check_uniform(*_draws(cpu))

    # Same draws -> the same pixels as the CPU function, on real CIFAR-10 images.
    real = load_datasets("packed", str(cifar_root), augment=False, train_subset=64).train
    images = np.stack([real.source.image(int(j)) for j in real.indices])
    out = crop_flip(torch.from_numpy(images).permute(0, 3, 1, 2), torch.Generator().manual_seed(1), PAD)
    marks = crop_flip(batch[:64], torch.Generator().manual_seed(1), PAD).permute(0, 2, 3, 1).numpy()
    for i, (dy, dx, fl) in enumerate(zip(*_draws(marks))):
        want = random_crop_flip(images[i], _FixedRng(int(dy), int(dx), bool(fl)), PAD)  # type: ignore[arg-type]
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), want), i


def test_device_cache_run_and_config(tiny):
    """A run with data.device_cache trains, and evaluates the same images to the same accuracy as the CPU path."""
    cpu = pipeline.run(tiny("run_name=cpu", "phases=[{kind: evaluate}]"))
    dev = pipeline.run(tiny("run_name=dev", "data.device_cache=true",
                            "phases=[{kind: evaluate}, {kind: pretrain, epochs: 1, steps_per_epoch: 3}]"))
    client = tracking.client(cpu.tracking_uri)
    a, b = (client.get_run(r.phase_ids[0]).data.metrics for r in (cpu, dev))
    assert a["top1"] == b["top1"] and a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6)
    assert np.isfinite(client.get_run(dev.phase_ids[1]).data.metrics["epoch_train_loss"])
    with pytest.raises(ConfigError, match="data.device_cache: holds CIFAR-style datasets only"):
        pipeline.run(tiny("data.dataset=synthetic", "data.device_cache=true"))
