"""ImageNet input pipelines, images/s per loader core, on the real JPEGs of shared/data/imagenet-sample.

Output of every pipeline: 224 px RandomResizedCrop + horizontal flip batches (train).
  (a) torchvision's usual: ImageFolder, Pillow decode, RandomResizedCrop, flip, ToTensor, Normalize
  (b) the project's ImageFolder path (data.dataset=imagenet: trainer/data/images.py ImageNetTransform)
  (c) the packed path (data.dataset=shards): tar shards, uint8 crop in the loader processes with
      Pillow's DCT-domain reduced decode (draft); normalisation is left to the training device,
      so the batches timed here are uint8 (B, 224, 224, 3)
  (c-nodraft) the same without draft; (c-tv) torchvision.io.decode_jpeg + tensor crop instead of
      Pillow (the shards loader's default, chosen by these figures); (c-320) (c-tv) on shards
      packed with --max-side 320
Each runs as a DataLoader with 1 and 2 loader processes (batch 32); images/s per core =
images/s / loader processes (the main process only receives batches). The variants run
interleaved, round by round, in this one process; medians over rounds are reported. The first
batch of every run is not timed (fork + first decode). A decode-only table (one process, no
loader) shows what bounds the per-core rate.

``--device-decode`` times instead what a training step receives: the shards loader's normalised
batches on the device, decoded in the loader processes (data.decode=cpu) against nvJPEG on the
GPU (data.decode=gpu, crop and flip on the device too); the gpu rows say "skipped: no GPU" on CPU.

    python -m bench.input_pipeline --repeat 3 --rounds 5 --json input_pipeline.json
    python -m bench.input_pipeline --device-decode --rounds 3
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from bench.common import add_json_option, pick_device, start, sync
from trainer.data import IMAGENET_STATS, load_datasets, make_loader, set_loader_epoch
from trainer.data.decode import decode_train
from trainer.data.shard_writer import PackOptions, pack

# <wnid>/<file>.JPEG folders of real ImageNet images; TDC_IMAGENET_SAMPLE points at another copy.
SAMPLE = Path(os.environ.get("TDC_IMAGENET_SAMPLE",
                             Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample" / "val"))
H100 = {"ResNet-50": 4000, "ResNet-18": 12000}  # images/s one H100 trains (bf16, channels_last): the rate the input pipeline must feed


def build_tree(root: Path, repeat: int, sample: Path = SAMPLE, limit: int = 0) -> Path:
    """root/train/<wnid>/<k>_<name> -> the sample JPEGs, ``repeat`` links per image; val/ the sample itself.

    ``limit`` > 0: only the first that many images (classes and files sorted by name), in both splits."""
    if not sample.is_dir():
        raise SystemExit(f"--sample {sample}: no such directory (ImageNet JPEGs in <wnid>/ folders; "
                         "TDC_IMAGENET_SAMPLE sets the default)")
    files = [f for d in sorted(d for d in sample.iterdir() if d.is_dir()) for f in sorted(d.iterdir()) if f.is_file()]
    if not files:  # e.g. the sample's root, whose train/ and val/ hold the <wnid>/ folders
        inner = [d for d in (sample / "val", sample / "train") if d.is_dir()]
        raise SystemExit(f"--sample {sample}: no image files in its <wnid>/ folders (ImageNet JPEGs in <wnid>/ "
                         "folders; TDC_IMAGENET_SAMPLE sets the default)"
                         + (f"; {inner[0]} looks like one" if inner else ""))
    for f in files[:limit or None]:
        for split, names in (("train", [f"{k}_{f.name}" for k in range(repeat)]), ("val", [f.name] if limit else [])):
            for name in names:  # no limit: val/ is a link to the whole sample, made below
                (root / split / f.parent.name).mkdir(parents=True, exist_ok=True)
                (root / split / f.parent.name / name).symlink_to(f)
    if not limit:
        (root / "val").symlink_to(sample)
    return root


def torchvision_loader(tree: Path, workers: int, batch: int) -> Iterable:
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(*IMAGENET_STATS)])
    ds = datasets.ImageFolder(str(tree / "train"), tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)


def project_loader(tree: Path, workers: int, batch: int) -> Iterable:
    sets = load_datasets("imagenet", str(tree), seed=0)
    loader = make_loader(sets.train, batch, rank=0, world_size=1, shuffle=True, seed=0, drop_last=True,
                         num_workers=workers)
    set_loader_epoch(loader, 0)
    return loader


def shard_loader(shards: Path, workers: int, batch: int, decoder: str = "tv") -> Iterable:
    sets = load_datasets("shards", str(shards), seed=0)
    sets.train.decoder = decoder
    loader = make_loader(sets.train, batch, rank=0, world_size=1, shuffle=True, seed=0, drop_last=True,
                         num_workers=workers, device="cpu")
    set_loader_epoch(loader, 0)
    return loader.loader  # the uint8 batches the loader processes make (normalised later on the device)


def time_loader(make: Callable[[int], Iterable], workers: int) -> float:
    """Images/s per loader process of ``make(workers)``, first batch excluded."""
    it = iter(make(workers))
    first = next(it)
    n, t0 = 0, time.perf_counter()
    for x, _ in it:
        n += x.shape[0]
    del first
    return n / (time.perf_counter() - t0) / max(workers, 1)


def device_decode(shards: Path, device: torch.device, workers: list[int], batch: int, rounds: int) -> list[dict]:
    """Images/s of the shards train loader delivering normalised batches on ``device``: decoded in ``workers``
    loader processes (data.decode=cpu) or by nvJPEG (data.decode=gpu); medians over ``rounds``, first batch
    of each pass untimed (worker fork, first decode, nvJPEG's handles)."""
    rows: list[dict] = []
    for decode in ("cpu", "gpu"):
        for w in workers:
            if decode == "gpu" and device.type != "cuda":
                rows.append({"decode": decode, "procs": w, "skipped": "no GPU"})
                continue
            rates = []
            for _ in range(rounds):
                sets = load_datasets("shards", str(shards), seed=0, decode=decode)
                loader = make_loader(sets.train, batch, rank=0, world_size=1, shuffle=True, seed=0, drop_last=True,
                                     num_workers=w, device=device)
                set_loader_epoch(loader, 0)
                it = iter(loader)
                next(it)
                sync(device)
                n, t0 = 0, time.perf_counter()
                for x, _ in it:
                    n += x.shape[0]
                sync(device)
                rates.append(n / (time.perf_counter() - t0))
            rows.append({"decode": decode, "procs": w, "img_s": statistics.median(rates), "rounds": rates,
                         "device": str(device)})
    cpu = {r["procs"]: r["img_s"] for r in rows if r["decode"] == "cpu"}
    for r in rows:
        if "img_s" in r:
            r["vs_cpu_decode"] = r["img_s"] / cpu[r["procs"]]
    return rows


def decode_only(shards: Path, n: int, rounds: int) -> dict[str, float]:
    """Images/s of one core for each decode method on the same stored bytes (no loader, no normalisation)."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import functional as F
    from torchvision.transforms.v2 import functional as F2

    from trainer.data.decode import resized_crop_box
    from trainer.data.shards import load_index, read_shard, split_shards

    shard_list = split_shards(shards, load_index(shards), "val")
    blobs = [d for s in shard_list for d, _ in read_shard(s, 0, s.samples)][:n]

    def pil_full(data: bytes, rng: np.random.Generator) -> None:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        t, lft, h, w = resized_crop_box(img.width, img.height, rng)
        np.asarray(F.resized_crop(img, t, lft, h, w, [224, 224], antialias=True))

    def tvio(data: bytes, rng: np.random.Generator) -> None:
        img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        t, lft, h, w = resized_crop_box(img.shape[2], img.shape[1], rng)
        F2.resized_crop(img, t, lft, h, w, [224, 224], antialias=True)

    methods = {"pil_full_decode": pil_full, "torchvision.io_decode_jpeg": tvio,
               "pil_draft": lambda d, r: decode_train(d, 224, r),
               "pil_no_draft": lambda d, r: decode_train(d, 224, r, draft=False),
               "pil_decode_only_no_crop": lambda d, r: np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))}
    torch.set_num_threads(1)
    rates: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            rng = np.random.default_rng(0)
            t0 = time.perf_counter()
            for data in blobs:
                fn(data, rng)
            rates[name].append(len(blobs) / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


# long: the benchmark's options, then its steps in the order it prints them
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="links per sample image in train/ (250 x repeat images)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", default="1,2", help="loader processes to time, comma-separated")
    p.add_argument("--only", default="b,c", help="variants besides (a) to time, by letter prefix: b,c,c-tv,...")
    p.add_argument("--sample", type=Path, default=SAMPLE, help="ImageNet JPEGs in <wnid>/ folders")
    p.add_argument("--limit", type=int, default=0, help="use the first N images of --sample (0: all)")
    p.add_argument("--device-decode", action="store_true",
                   help="only the loader's batches on the device: decode in loader processes vs nvJPEG")
    add_json_option(p)
    args = p.parse_args()
    device = pick_device() if args.device_decode else torch.device("cpu")
    report = start("input_pipeline", device, args)
    tmp = Path(tempfile.mkdtemp(prefix="input_pipeline_"))
    tree = build_tree(tmp / "tree", args.repeat, args.sample, args.limit)
    workers = [int(w) for w in args.workers.split(",")]
    if args.device_decode:
        pack(tree, tmp / "shards", PackOptions(), workers=2, progress=lambda line: None)
        print(f"normalised train batches on {device} (batch {args.batch}, median of {args.rounds} passes over "
              f"{sum(f.is_file() for f in (tree / 'train').rglob('*'))} train images)")
        for r in device_decode(tmp / "shards", device, workers, args.batch, args.rounds):
            report.add(r)
            print(f"  decode {r['decode']:3s} procs {r['procs']}: " + (
                f"skipped: {r['skipped']}" if "skipped" in r else
                f"{r['img_s']:8.0f} img/s ({r['vs_cpu_decode']:.2f}x decode=cpu)"), flush=True)
        report.finish()
        return
    t0 = time.perf_counter()
    pack(tree, tmp / "shards", PackOptions(), workers=2, progress=lambda line: None)
    pack(tree, tmp / "shards320", PackOptions(max_side=320), workers=2, progress=lambda line: None)  # (c-320)
    print(f"packed {250 * args.repeat} train images twice in {time.perf_counter() - t0:.0f}s ({tmp})", flush=True)
    variants: dict[str, Callable[[int], Iterable]] = {
        "(a) torchvision ImageFolder": lambda w: torchvision_loader(tree, w, args.batch),
        "(b) project imagenet": lambda w: project_loader(tree, w, args.batch),
        "(c) shards, Pillow draft": lambda w: shard_loader(tmp / "shards", w, args.batch, decoder="pil"),
        "(c-nodraft) shards": lambda w: shard_loader(tmp / "shards", w, args.batch, decoder="pil_nodraft"),
        "(c-tv) shards, tv.io (default)": lambda w: shard_loader(tmp / "shards", w, args.batch, decoder="tv"),
        "(c-320) shards max-side 320": lambda w: shard_loader(tmp / "shards320", w, args.batch),
    }
    variants = {k: v for k, v in variants.items() if k.startswith("(a)") or any(k.startswith(f"({o}") for o in
                                                                               args.only.split(","))}
    rates: dict[tuple[str, int], list[float]] = {(v, w): [] for v in variants for w in workers}
    for r in range(args.rounds):
        for w in workers:
            for name, make in variants.items():
                rates[(name, w)].append(time_loader(make, w))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    print(f"\nimages/s per loader process (median of {args.rounds} interleaved rounds, 224 px RandomResizedCrop + flip,"
          f" batch {args.batch}, {250 * args.repeat} images a run)")
    print(f"{'pipeline':32s} {'procs':>5s} {'img/s/core':>10s} {'vs (a)':>7s} " +
          " ".join(f"{'cores ' + m:>15s}" for m in H100))
    for w in workers:
        base = statistics.median(rates[("(a) torchvision ImageFolder", w)])
        for name in variants:
            med = statistics.median(rates[(name, w)])
            need = {m: ips / med for m, ips in H100.items()}
            report.add({"pipeline": name, "procs": w, "per_core": med, "vs_a": med / base,
                        "cores_needed": need, "rounds": rates[(name, w)]})
            print(f"{name:32s} {w:5d} {med:10.0f} {med / base:6.2f}x " +
                  " ".join(f"{need[m]:15.1f}" for m in H100), flush=True)
    dec = decode_only(tmp / "shards", 250, args.rounds)
    print("\none core, no loader: decode + 224 px random-resized crop of the same stored JPEGs (img/s)")
    for k, v in dec.items():
        print(f"  {k:32s} {v:8.0f}")
    report.finish(decode_only=dec)


if __name__ == "__main__":
    main()
