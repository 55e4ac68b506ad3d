"""Image primitives of every package: RGB on white, seeded random-resized crops, [0, 1] tensors, files.

The pretraining data (``beit3.pretrain.data``), finetuning data and tokenizer training all convert and crop
with these. Kept free of torchvision (not a dependency): PIL decodes and resizes, numpy draws the crop
boxes from a seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from beit3.tokenizers.errors import TokenizersError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class ImageInputError(TokenizersError, ValueError):
    """Image inputs that cannot be used (no files, unreadable files); the message names the fix."""


class NonFiniteImageError(ImageInputError):
    """A float image holding NaN or infinity: scaled to 8 bits it would be one flat value."""


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files among ``inputs`` (files, or directories searched recursively), sorted for determinism."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise ImageInputError(f"image input {str(path)!r} does not exist")
    if not found:
        raise ImageInputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {list(map(str, inputs))}")
    return found


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white (stamps, emoji), 16-bit and float scaled down, CMYK etc.
    converted. Float images with NaN or infinity raise :class:`NonFiniteImageError`."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        # PIL's own I;16 -> RGB conversion clips at 255 (a white image); scale the range instead.
        arr = np.asarray(img).astype(np.float64)
        if not np.isfinite(arr).all():
            raise NonFiniteImageError(f"mode {mode} with NaN or infinite pixels")
        if mode == "F":
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        elif arr.max() > 255:
            arr = arr / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """The image file at ``path`` in RGB (:func:`to_rgb`)."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def sample_crop(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """A random crop box ``(left, top, crop_w, crop_h)`` covering ``scale`` of the area at aspect ``ratio``.

    Ten tries of area ~ U(scale) and log-aspect ~ U(log ratio); if none fits, the largest centred crop whose
    aspect lies within ``ratio`` (the usual random-resized-crop fallback).
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= width and 0 < ch <= height:
            left = int(rng.integers(0, width - cw + 1))
            top = int(rng.integers(0, height - ch + 1))
            return left, top, cw, ch
    in_ratio = width / height
    if in_ratio < ratio[0]:
        cw, ch = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        cw, ch = int(round(height * ratio[1])), height
    else:
        cw, ch = width, height
    cw, ch = max(1, min(cw, width)), max(1, min(ch, height))
    return (width - cw) // 2, (height - ch) // 2, cw, ch


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
) -> Image.Image:
    """A :func:`sample_crop` box resized (bicubic) to ``size``, mirrored with probability ``hflip`` (the
    Inception-style recipe BEiT v2 uses)."""
    left, top, cw, ch = sample_crop(img.width, img.height, scale, ratio, rng)
    out = img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    if rng.random() < hflip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def center_view(img: Image.Image, size: int) -> Image.Image:
    """The largest centred square, resized (bicubic) to ``size`` (an evaluation view)."""
    W, H = img.size
    side = min(W, H)
    box = ((W - side) // 2, (H - side) // 2, (W - side) // 2 + side, (H - side) // 2 + side)
    return img.resize((size, size), Image.BICUBIC, box=box)


def fixed_views(
    paths: list[Path], size: int, views_per_image: int, seed: int, scale: tuple[float, float] = (0.08, 1.0)
) -> torch.Tensor:
    """(N * views, 3, size, size) in [0, 1]: a centred view plus ``views_per_image - 1`` random crops each.

    Views are fixed (seeded) so that teacher features can be computed once and cached.
    """
    rng = np.random.default_rng(seed)
    views = []
    for path in paths:
        try:
            img = load_rgb(path)
        except OSError as err:
            raise ImageInputError(f"cannot read image {path}: {err}") from err
        views.append(to_tensor(center_view(img, size)))
        views += [to_tensor(random_resized_crop(img, size, rng, scale)) for _ in range(views_per_image - 1)]
    return torch.stack(views)
