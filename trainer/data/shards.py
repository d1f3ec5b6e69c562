"""Reading packed tar shards (:mod:`trainer.data.shard_writer`): per-rank, per-loader-worker slices, shuffled per epoch.

The epoch plan (pure, :func:`epoch_plan`): the split's shards are put in a new order each epoch
(seeded by ``(seed, epoch)``) and read as one stream of N samples. Training uses the first
``R * b * B`` positions of that stream, ``b = N // (R * B)`` full batches per rank (R ranks,
batch B per rank): the remaining ``N mod (R * B)`` samples are dropped, a different set each
epoch since the shard order changes. Rank r takes the contiguous positions
``[r * b * B, (r + 1) * b * B)``; inside a rank, loader worker w (of W) takes batches
w, w + W, ... of the rank's output as one contiguous sub-range. So every used sample is read
exactly once per epoch across all ranks and workers, every rank yields exactly ``b`` batches
(what the data-parallel collectives need), and each worker reads whole runs of one or two
shards sequentially, splitting shards at the sample level where the counts do not divide.

Inside a worker a shuffle buffer of ``shuffle_buffer`` samples draws the output order from
``(seed, epoch, rank, worker)``; the order is computed over positions before any byte is read,
so resuming after k batches skips exactly the samples of those k batches without decoding them
(same world size, loader workers and batch size). Evaluation reads the shards in index order,
splits the N positions evenly into R * W ranges, unshuffled and unpadded.
"""
from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from trainer.data.common import DatasetError

_EPOCH_TAG = 0x5EA5  # keeps this seed stream apart from the others drawn from the same seed


class ShardError(DatasetError):
    """A shard or the index is missing, truncated or malformed; the message names the file."""


@dataclass(frozen=True)
class Shard:
    """One tar shard of a split: its path, sample count and expected size in bytes."""

    path: Path
    samples: int
    bytes: int


def load_index(root: Path) -> dict:
    """``root/index.json``, checked for the keys the reader needs."""
    path = root / "index.json"
    if not path.is_file():
        raise ShardError(f"{path} not found: pack an ImageFolder tree with `tdcompress pack SRC {root}` "
                         "(an interrupted pack writes the index last; rerun it to finish)")
    try:
        index = json.loads(path.read_text())
        if not str(index["format"]).startswith("tdcompress-shards/"):
            raise ValueError(f"format {index['format']!r}")
        missing = [k for k in ("classes", "splits") if k not in index]
        if missing:
            raise KeyError(missing[0])
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{path} is not a shard index written by `tdcompress pack` ({exc})") from exc
    return index


def split_shards(root: Path, index: dict, split: str) -> list[Shard]:
    """The shards of ``split``; each must exist with the size the index records (a truncated copy fails here)."""
    if split not in index["splits"]:
        raise ShardError(f"{root / 'index.json'} has no {split!r} split (has {sorted(index['splits'])}); "
                         f"pack a tree with {split}/ in it")
    out = []
    for rec in index["splits"][split]["shards"]:
        path = root / rec["name"]
        if not path.is_file():
            raise ShardError(f"shard {path} (listed in {root / 'index.json'}) not found")
        size = path.stat().st_size
        if size != rec["bytes"]:
            raise ShardError(f"shard {path} is {size:,} bytes but the index says {rec['bytes']:,}: truncated or "
                             "changed; copy it again or rerun `tdcompress pack`")
        out.append(Shard(path, int(rec["samples"]), int(rec["bytes"])))
    return out


def even_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) cut into ``parts`` contiguous ranges whose lengths differ by at most one."""
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]


def epoch_plan(counts: list[int], *, epoch: int, seed: int, rank: int, world: int, worker: int, workers: int,
               batch: int, train: bool, shuffle: bool = True) -> tuple[list[int], int, int]:
    """Which stream positions worker ``worker`` of rank ``rank`` reads this epoch.

    Returns:
        (shard order, first position, end position) of the stream that concatenates the shards
        (counts ``counts``) in that order. See the module docstring for the split.
    """
    n = sum(counts)
    if train:
        order = (np.random.default_rng([seed, _EPOCH_TAG, epoch]).permutation(len(counts)).tolist()
                 if shuffle else list(range(len(counts))))
        per_rank = n // (world * batch)  # full batches of every rank
        mine = [len(range(w, per_rank, workers)) for w in range(workers)]
        start = rank * per_rank * batch + sum(mine[:worker]) * batch
        return order, start, start + mine[worker] * batch
    lo, hi = even_ranges(n, world)[rank]
    a, b = even_ranges(hi - lo, workers)[worker]
    return list(range(len(counts))), lo + a, lo + b


def stream_slices(counts: list[int], order: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
    """Positions [start, end) of the stream as (shard, first sample, end sample) pieces, in stream order."""
    out, pos = [], 0
    for k in order:
        lo, hi = max(start, pos), min(end, pos + counts[k])
        if lo < hi:
            out.append((k, lo - pos, hi - pos))
        pos += counts[k]
    return out


def buffer_order(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The output order of a shuffle buffer of ``size`` over inputs 0..n-1 (each output once).

    Fill the buffer, then for each further input emit a random slot and put the input there;
    finally emit the rest in random order. Output k never needs more than k + size inputs read.
    """
    if size <= 1 or n <= 1:
        return np.arange(n)
    buf = list(range(min(size, n)))
    out = np.empty(n, dtype=np.int64)
    slots = rng.integers(0, len(buf), size=max(0, n - len(buf)))
    for i, p in enumerate(range(len(buf), n)):
        j = slots[i]
        out[i], buf[j] = buf[j], p
    out[n - len(buf):] = rng.permutation(buf)
    return out


def read_shard(shard: Shard, lo: int, hi: int) -> Iterator[tuple[bytes, int]]:
    """Samples ``lo..hi-1`` of ``shard`` as (encoded image, label), read sequentially."""
    k = -1
    image: bytes | None = None
    try:
        with tarfile.open(shard.path, "r:") as tf:
            for m in tf:
                stem, _, ext = m.name.partition(".")
                if ext == "jpg":
                    k += 1
                    if k >= hi:
                        return
                    f = tf.extractfile(m) if k >= lo else None
                    image = f.read() if f is not None else None
                elif ext == "cls" and lo <= k < hi:
                    f = tf.extractfile(m)
                    if image is None or f is None:
                        raise ShardError(f"shard {shard.path}: sample {stem} has a .cls without its .jpg")
                    yield image, int(f.read())
                    image = None
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        raise ShardError(f"shard {shard.path} cannot be read at sample {k} ({type(exc).__name__}: {exc}); "
                         "copy it again or rerun `tdcompress pack`") from exc
    if k + 1 < hi:
        raise ShardError(f"shard {shard.path} holds {k + 1} samples, the index says {shard.samples}")


def ordered_samples(shards: list[Shard], slices: list[tuple[int, int, int]], emit: np.ndarray,
                    skip: int = 0) -> Iterator[tuple[int, bytes, int]]:
    """(position, image, label) of ``slices`` (read once, in stream order) in the order ``emit``, minus the first ``skip``.

    ``emit`` is a permutation of range(total) over the slices' positions; positions among the
    first ``skip`` emitted are read past, never held (their bytes are not kept).
    """
    skipped = set(emit[:skip].tolist())
    stream = (s for k, lo, hi in slices for s in read_shard(shards[k], lo, hi))
    pending: dict[int, tuple[bytes, int]] = {}
    read = 0
    for p in emit[skip:].tolist():
        while p not in pending:
            item = next(stream)
            if read not in skipped:
                pending[read] = item
            read += 1
        yield (p, *pending.pop(p))
