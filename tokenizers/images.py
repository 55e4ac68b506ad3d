"""Image files to [0, 1] tensors for tokenizer training: file discovery, decoding, seeded random crops.

Kept free of torchvision: PIL decodes and resizes, numpy draws the crop boxes from a seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class ImageInputError(ValueError):
    """Image inputs that cannot be used (no files, unreadable files); the message names the fix."""


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


def load_rgb(path: str | Path) -> Image.Image:
    """An RGB image; transparent pixels are composited onto white (stamps, emoji)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "P"):
            img = img.convert("RGBA")
            canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, img).convert("RGB")
        return img.convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
) -> Image.Image:
    """A crop of random area fraction ``scale`` and log-uniform aspect ``ratio``, resized (bicubic) to
    ``size``; falls back to the largest centred crop after 10 tries (the Inception-style recipe BEiT v2 uses).
    """
    W, H = img.size
    box = None
    for _ in range(10):
        area = W * H * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            left, top = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
            box = (left, top, left + w, top + h)
            break
    if box is None:
        side = min(W, H)
        box = ((W - side) // 2, (H - side) // 2, (W - side) // 2 + side, (H - side) // 2 + side)
    out = img.resize((size, size), Image.BICUBIC, box=box)
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
