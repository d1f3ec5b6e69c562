"""Input pipeline throughput: the per-item CPU path vs ``data.device_cache`` (decode once, augment on the device).

Times one augmented training pass over ``--images`` CIFAR-10 images (no model: the data side alone)
through :func:`trainer.data.make_loader` (Pillow decode + numpy crop/flip + normalise per item) and
through :func:`trainer.data.device_cache.make_device_loader` (its one-off decode timed separately), and
prints images/s and their ratio, naming the device.

    TDC_DATA_ROOT=../shared/data/cifar10 python -m bench.device_cache --images 10000 [--device cuda]
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.common import add_json_option, start, sync
from trainer.data import data_root, load_datasets, make_loader, set_loader_epoch
from trainer.data.device_cache import make_device_loader


def _pass(loader, device: torch.device) -> float:
    """Seconds for one epoch of batches, each moved to ``device`` (what the training loop does)."""
    set_loader_epoch(loader, 1)
    t0 = time.perf_counter()
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000, help="training images (a seeded subset; 0 = all 50k)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--loader-workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_json_option(p)
    args = p.parse_args()
    device = torch.device(args.device)
    report = start("device_cache", device, args)
    sets = load_datasets("packed", data_root(None), augment=True, seed=0, train_subset=args.images)
    n = len(sets.train)
    cpu = make_loader(sets.train, args.batch, rank=0, world_size=1, shuffle=True, seed=0, drop_last=True,
                      num_workers=args.loader_workers)
    t_cpu = _pass(cpu, device)
    t0 = time.perf_counter()
    dev = make_device_loader(sets.train, args.batch, rank=0, world_size=1, shuffle=True, seed=0, drop_last=True,
                             device=device)
    t_decode = time.perf_counter() - t0
    _pass(dev, device)  # warm-up (kernels, allocator)
    t_dev = _pass(dev, device)
    print(f"{n} images, batch {args.batch}, loader_workers {args.loader_workers}")
    print(f"per-item CPU path : {n / t_cpu:10,.0f} img/s ({t_cpu:.2f} s per pass)")
    print(f"device cache      : {n / t_dev:10,.0f} img/s ({t_dev:.2f} s per pass; one-off decode {t_decode:.2f} s)")
    print(f"ratio device cache / CPU path: {t_cpu / t_dev:.1f}x", flush=True)
    report.add({"images": n, "batch": args.batch, "loader_workers": args.loader_workers, "device": str(device),
                "cpu_path_img_s": n / t_cpu, "device_cache_img_s": n / t_dev, "decode_once_s": t_decode,
                "ratio": t_cpu / t_dev})
    report.finish()


if __name__ == "__main__":
    main()
