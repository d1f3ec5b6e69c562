"""Pack an ImageFolder tree into WebDataset-style tar shards plus an index (``tdcompress pack``).

Output in DST:
- ``<split>-NNNNN.tar``: plain tar files (readable by ``tar``, WebDataset, ...) holding, per
  sample, ``<key>.jpg`` (an RGB JPEG) and ``<key>.cls`` (the class index as ASCII digits).
  ``key`` is the 8-digit position of the source file in the split's (seeded, shuffled) file
  list, so keys increase within and across shards. A shard is written as ``.tar.tmp`` and is
  final once renamed; headers carry no times or owners, so a pack is reproducible byte for byte.
- ``pack-plan.json``: the file lists and options (written first); a rerun checks against it.
- ``index.json`` (written last, atomically): classes, options and per split the sample count,
  skipped files, and each shard's name, sample count, size in bytes and sha256.

Images are shuffled at pack time (class-sorted shards would give one class per read-time shuffle
buffer). An RGB JPEG no larger than ``max_side`` is stored byte for byte; anything else
(grayscale, CMYK, PNG data behind a .JPEG name, larger images) is decoded, converted to RGB,
shrunk so its longer side is ``max_side`` and re-encoded at ``quality``. A rerun after an
interruption keeps the finished shards and resumes at the first unfinished one.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from trainer.checkpoints.files import atomic_write_text, file_digest

INDEX, PLAN, FORMAT = "index.json", "pack-plan.json", "tdcompress-shards/1"
SPLITS = ("train", "val")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_BLOCK = 512  # tar block: each member costs a header block plus its data rounded up to blocks


class PackError(Exception):
    """The source tree or the destination cannot be packed; the message names the files."""


@dataclass(frozen=True)
class PackOptions:
    """What to store. ``max_side`` None keeps every image's size; ``shard_bytes`` is the target shard size."""

    max_side: int | None = 500
    quality: int = 90
    shard_bytes: int = 256 << 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_side is not None and self.max_side < 32:
            raise ValueError(f"max_side must be >= 32 px or None (keep sizes), got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {self.quality}")
        if self.shard_bytes < 1 << 16:
            raise ValueError(f"shard_bytes must be >= 65536, got {self.shard_bytes}")


def list_tree(src: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Classes (sorted folder names) and per split present the (relative path, label) list, sorted.

    Raises:
        PackError: no train/ or val/ split, no class folder, or splits with different classes.
    """
    found = [s for s in SPLITS if (src / s).is_dir()]
    if not found:
        raise PackError(f"{src}: no train/ or val/ folder (expected SRC/train/<class>/*.JPEG and/or SRC/val/...)")
    classes: list[str] | None = None
    files: dict[str, list[tuple[str, int]]] = {}
    for split in found:
        names = sorted(d.name for d in (src / split).iterdir() if d.is_dir() and not d.name.startswith("."))
        if not names:
            raise PackError(f"{src / split}: no class folders")
        if classes is not None and names != classes:
            raise PackError(f"{src}: train/ and val/ hold different class folders "
                            f"({len(classes)} vs {len(names)}; first difference: "
                            f"{sorted(set(classes) ^ set(names))[:3]})")
        classes = names
        files[split] = [(f"{split}/{c}/{p.name}", label) for label, c in enumerate(names)
                        for p in sorted((src / split / c).iterdir())
                        if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
        if not files[split]:
            raise PackError(f"{src / split}: no image files ({', '.join(IMAGE_EXTS)})")
    assert classes is not None
    return classes, files


def encode_image(raw: bytes, max_side: int | None, quality: int) -> bytes:
    """The bytes to store for one source file (an RGB JPEG); raises what Pillow raises for a bad file."""
    with Image.open(io.BytesIO(raw)) as im:
        w, h = im.size
        scale = max_side / max(w, h) if max_side and max(w, h) > max_side else 1.0
        if im.format == "JPEG" and im.mode == "RGB" and scale == 1.0:
            im.load()  # decode fully: a truncated or corrupt file fails here, not in training
            return raw
        if scale < 1.0 and im.format == "JPEG":
            im.draft(im.mode, (max(1, int(w * scale)), max(1, int(h * scale))))  # DCT-domain shrink, >= target
        img = im.convert("RGB")  # L, CMYK (Adobe-inverted handled by Pillow), P, RGBA, ...
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _encode_job(args: tuple[str, int | None, int]) -> bytes | str:
    """Worker-process side: the stored bytes, or the error text (the main process names the file)."""
    path, max_side, quality = args
    try:
        return encode_image(Path(path).read_bytes(), max_side, quality)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        return f"{type(exc).__name__}: {exc}"


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.tar"


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644  # fixed metadata: reproducible shards
    return info


def _sample_cost(n: int) -> int:
    """Tar bytes of one sample: the .jpg (header + padded data) and the .cls (header + one block)."""
    return _BLOCK + -(-n // _BLOCK) * _BLOCK + 2 * _BLOCK


def _finished(dst: Path, split: str) -> list[dict]:
    """Records of the final shards of ``split`` already in ``dst`` (a rerun keeps them): read back from the tars."""
    out = []
    while (path := dst / shard_name(split, len(out))).is_file():
        try:
            with tarfile.open(path, "r:") as tf:
                keys = [m.name.split(".", 1)[0] for m in tf if m.name.endswith(".cls")]
        except (tarfile.TarError, OSError) as exc:
            raise PackError(f"{path}: a finished shard cannot be read ({exc}); delete it to pack it again") from exc
        out.append({"name": path.name, "samples": len(keys), "bytes": path.stat().st_size,
                    "sha256": file_digest(path), "next": int(keys[-1]) + 1 if keys else 0})
    return out


def _check_plan(dst: Path, plan: dict) -> None:
    path = dst / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            changed = sorted(k for k in plan if old.get(k) != plan[k])
            raise PackError(f"{dst} holds a pack of another source or other options (differs in: {', '.join(changed)}; "
                            f"see {path}); pack into an empty directory, or delete its shards to start over")
    else:
        atomic_write_text(path, json.dumps(plan, sort_keys=True))


def pack(src: Path | str, dst: Path | str, options: PackOptions = PackOptions(), *, skip_bad: bool = False,
         workers: int = 1, progress: Callable[[str], None] = print) -> dict:
    """Pack ImageFolder tree ``src`` (train/ and/or val/) into shards in ``dst``; returns the index.

    Args:
        skip_bad: an unreadable file is left out (named in the index and the progress lines)
            instead of failing the pack.
        workers: processes that decode and encode images (order and output do not depend on it).
        progress: called with one line per finished shard and split.
    Raises:
        PackError: an unreadable file (all of them are named, checked to the end of the split)
            without ``skip_bad``, or a destination holding another pack.
    """
    src, dst = Path(src), Path(dst)
    classes, files = list_tree(src)
    order = {s: [files[s][i] for i in np.random.default_rng([options.seed, k]).permutation(len(files[s]))]
             for k, s in enumerate(SPLITS) if s in files}
    plan = {"format": FORMAT, "classes": classes, "options": asdict(options),
            "files": {s: [f"{p}:{y}" for p, y in v] for s, v in order.items()}}
    dst.mkdir(parents=True, exist_ok=True)
    _check_plan(dst, plan)
    index: dict = {"format": FORMAT, "classes": classes, "options": asdict(options), "splits": {}}
    pool = ProcessPoolExecutor(workers) if workers > 1 else _Serial()
    try:
        for split, items in order.items():
            index["splits"][split] = _pack_split(src, dst, split, items, options, skip_bad, pool, progress)
    finally:  # an interrupt must not wait for queued images: drop them (a rerun resumes)
        pool.shutdown(wait=True, cancel_futures=True)
    atomic_write_text(dst / INDEX, json.dumps(index, indent=1))
    return index


class _Serial:
    """A one-process stand-in for the process pool (no fork for workers=1)."""

    def map(self, fn: Callable, items: list, chunksize: int = 1) -> Iterator:
        return map(fn, items)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        return None


def _encoded(pool, jobs: list, window: int = 512) -> Iterator[bytes | str]:
    """``_encode_job`` over ``jobs`` in order, at most two windows queued: memory stays bounded
    (a pool's map would queue every image of ImageNet at once) and the workers never wait for the writer."""
    queued = None
    for i in range(0, len(jobs), window):
        nxt = pool.map(_encode_job, jobs[i:i + window], chunksize=8)
        if queued is not None:
            yield from queued
        queued = nxt
    if queued is not None:
        yield from queued


def _pack_split(src: Path, dst: Path, split: str, items: list[tuple[str, int]], options: PackOptions,
                skip_bad: bool, pool, progress: Callable[[str], None]) -> dict:
    shards = _finished(dst, split)
    start = shards[-1]["next"] if shards else 0
    if shards:
        progress(f"{split}: {len(shards)} finished shards kept, resuming at file {start:,}/{len(items):,}")
    bad: list[str] = []
    skipped = 0 if not shards else start - sum(s["samples"] for s in shards)
    writer: tarfile.TarFile | None = None
    size, count, t0 = 0, 0, time.perf_counter()
    jobs = [(str(src / p), options.max_side, options.quality) for p, _ in items[start:]]
    for pos, out in enumerate(_encoded(pool, jobs), start=start):
        rel, label = items[pos]
        if isinstance(out, str):
            bad.append(f"{src / rel}: {out}")
            progress(f"{split}: unreadable {src / rel}: {out}")
            continue
        if bad and not skip_bad:
            continue  # stop writing, but check the rest so the error names every unreadable file
        cost = _sample_cost(len(out)) + _BLOCK
        if writer is not None and size + cost > options.shard_bytes:
            shards.append(_close(writer, dst, split, len(shards), count, pos))
            writer = None
            done = pos - start
            rate = done / max(time.perf_counter() - t0, 1e-9)
            progress(f"{split}: {shards[-1]['name']} ({count:,} images, {shards[-1]['bytes'] / 1e6:.1f} MB); "
                     f"{pos:,}/{len(items):,} files, {rate:,.0f} img/s, eta {(len(items) - pos) / rate / 60:.1f} min")
        if writer is None:
            writer = tarfile.open(dst / (shard_name(split, len(shards)) + ".tmp"), "w", format=tarfile.USTAR_FORMAT)
            size, count = 0, 0
        key = f"{pos:08d}"
        writer.addfile(_member(f"{key}.jpg", len(out)), io.BytesIO(out))
        cls = str(label).encode()
        writer.addfile(_member(f"{key}.cls", len(cls)), io.BytesIO(cls))
        size, count = size + cost, count + 1
    if bad and not skip_bad:
        if writer is not None:
            writer.close()
            os.remove(writer.name)
        raise PackError(f"{len(bad)} unreadable file(s) in {src / split}:\n  " + "\n  ".join(bad) +
                        "\nfix or remove them (then pack into an empty directory), or pass --skip-bad to leave "
                        f"them out; {len(shards)} finished shard(s) of {split} are kept")
    if writer is not None:
        shards.append(_close(writer, dst, split, len(shards), count, len(items)))
    skipped += len(bad)
    n = sum(s["samples"] for s in shards)
    progress(f"{split}: done, {n:,} images in {len(shards)} shards" + (f", {skipped} unreadable skipped" if skipped
                                                                         else ""))
    return {"samples": n, "skipped": skipped, "skipped_files": bad,
            "shards": [{k: s[k] for k in ("name", "samples", "bytes", "sha256")} for s in shards]}


def _close(writer: tarfile.TarFile, dst: Path, split: str, k: int, count: int, next_pos: int) -> dict:
    """Finish shard ``k``: close, fsync, rename from .tmp (now it is final), and describe it."""
    writer.close()
    tmp, final = Path(str(writer.name)), dst / shard_name(split, k)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return {"name": final.name, "samples": count, "bytes": final.stat().st_size, "sha256": file_digest(final),
            "next": next_pos}
