"""ImageNet-style JPEG decode: encoded bytes -> uint8 crops on the CPU, or batched on a GPU.

Train: RandomResizedCrop(size) + horizontal flip; eval: Resize(size * 256 / 224) + CenterCrop(size).
Both return ``(size, size, 3)`` uint8 arrays (HWC): a batch of them, moved to the device and
permuted to NCHW by :func:`normalize_on_device`, is already channels_last in memory, and the
per-pixel float work runs on the training device instead of the loader processes.

Two train decoders draw the same crop and flip: :func:`decode_train_tv` (torchvision.io, the
shards loader's default: faster per core in bench/input_pipeline.py) and :func:`decode_train`
(Pillow), which decodes at reduced size in the DCT domain (``draft``: libjpeg scales by 1/2, 1/4
or 1/8 while decoding) whenever the crop stays at least ``size`` px on both sides after the
reduction, so the final resize still only shrinks. On ImageNet-sized images (500x375) that is
rare for a 224 px output, which is why draft bought little. The eval path decodes at full size, so
its pixels equal torchvision's ``Resize`` + ``CenterCrop`` on a Pillow decode of the same bytes.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

EVAL_RESIZE_RATIO = 256 / 224  # the resize side before the center crop, as a multiple of the crop


def resized_crop_box(width: int, height: int, rng: np.random.Generator,
                     scale: tuple[float, float] = (0.08, 1.0),
                     ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from ``rng``: (top, left, height, width) in px."""
    area = width * height
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        w, h = round((target * aspect) ** 0.5), round((target / aspect) ** 0.5)
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # fallback: central crop at the clamped aspect ratio
    w, h = ((width, round(width / ratio[0])) if in_ratio < ratio[0] else
            (round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height))
    return (height - h) // 2, (width - w) // 2, h, w


def draft_factor(crop_h: int, crop_w: int, size: int) -> int:
    """The largest DCT scale-down (1, 2, 4 or 8) that keeps a ``crop_h`` x ``crop_w`` crop >= ``size`` px a side."""
    k = 1
    while k < 8 and min(crop_h, crop_w) >= 2 * k * size:
        k *= 2
    return k


def decode_train(data: bytes, size: int, rng: np.random.Generator, *, draft: bool = True) -> np.ndarray:
    """Random-resized crop + flip of one encoded image: ``(size, size, 3)`` uint8.

    The crop box and flip are drawn from ``rng`` on the full-size image (only its header is read
    for that), so they do not depend on ``draft``; with ``draft`` the JPEG is decoded at 1/k scale
    (k from :func:`draft_factor`) and the box is mapped onto the reduced image.
    """
    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        top, left, h, w = resized_crop_box(width, height, rng)
        flip = rng.random() < 0.5
        k = draft_factor(h, w, size) if draft and im.format == "JPEG" else 1
        if k > 1:
            im.draft("RGB", (math.ceil(width / k), math.ceil(height / k)))
        sx, sy = im.size[0] / width, im.size[1] / height
        img = im.convert("RGB") if im.mode != "RGB" else im
        # One resize of just the box (Pillow's filter widens with the scale: antialiased, like torchvision's).
        out = img.resize((size, size), Image.Resampling.BILINEAR,
                         box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def decode_train_tv(data: bytes, size: int, rng: np.random.Generator) -> np.ndarray:
    """:func:`decode_train` through ``torchvision.io.decode_jpeg`` (libjpeg-turbo, full size) and a tensor
    resized crop (antialiased bilinear): the same crop box and flip draws, ``(size, size, 3)`` uint8 view."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    top, left, h, w = resized_crop_box(int(img.shape[2]), int(img.shape[1]), rng)
    out = F.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    if rng.random() < 0.5:
        out = out.flip(-1)
    return out.permute(1, 2, 0).numpy()


def decode_eval(data: bytes, size: int) -> np.ndarray:
    """Resize (shorter side to ``round(size * 256 / 224)``) + center crop of one encoded image: ``(size, size, 3)`` uint8.

    Same arithmetic as torchvision's ``F.resize(img, s)`` + ``F.center_crop(img, [size, size])`` on a
    Pillow image (bilinear, antialiased), so the pixels are equal, not merely close.
    """
    side = round(size * EVAL_RESIZE_RATIO)
    with Image.open(io.BytesIO(data)) as im:
        img = im.convert("RGB")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = side, int(side * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    if new_h < size or new_w < size:  # torchvision pads with zeros; only for crops larger than the resize
        canvas = Image.new("RGB", (max(size, new_w), max(size, new_h)))
        canvas.paste(img, ((max(size, new_w) - new_w) // 2, (max(size, new_h) - new_h) // 2))
        img, new_w, new_h = canvas, max(size, new_w), max(size, new_h)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)))


def eval_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """The (top, left, h, w) box of the original image that the eval resize + center crop keeps (GPU path)."""
    side = round(size * EVAL_RESIZE_RATIO)
    keep = min(width, height) * size / side  # the crop side measured in original pixels
    h, w = min(height, round(keep)), min(width, round(keep))
    return (height - h) // 2, (width - w) // 2, h, w


def normalize_on_device(x: torch.Tensor, device: torch.device, mean: torch.Tensor, inv_std: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 on any device -> (B, 3, H, W) float32 on ``device``, ``(x / 255 - mean) / std``.

    ``mean`` and ``inv_std`` are (3,) float32 tensors already scaled to 0..255 pixel units and on
    ``device``. The uint8 batch crosses the bus (4x fewer bytes than float32); on a GPU the result
    keeps the NHWC memory order (channels_last), on the CPU it is made contiguous NCHW.
    """
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    x = x.sub_(mean[:, None, None]).mul_(inv_std[:, None, None])
    return x if device.type == "cuda" else x.contiguous()


def decode_batch_gpu(encoded: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor, size: int,
                     device: torch.device) -> torch.Tensor:
    """nvJPEG decode of a batch on ``device``, then per-image crop + resize + flip there.

    Args:
        encoded: B 1-D uint8 CPU tensors, each one JPEG file's bytes.
        boxes: (B, 4) int64 (top, left, h, w) in full-size pixels.
        flips: (B,) bool.
    Returns:
        (B, size, size, 3) uint8 on ``device`` (the layout :func:`normalize_on_device` takes).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    out = torch.empty((len(encoded), size, size, 3), dtype=torch.uint8, device=device)
    for i, (img, (top, left, h, w), flip) in enumerate(zip(images, boxes.tolist(), flips.tolist())):
        crop = img[None, :, top:top + h, left:left + w].float()
        res = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                              align_corners=False)
        if flip:
            res = res.flip(-1)
        out[i] = res[0].round_().clamp_(0, 255).permute(1, 2, 0).to(torch.uint8)
    return out
