"""Image augmentation for masked image modeling: one random crop seen at two sizes (PIL + numpy only).

Paper §2.3: random-resized crop, horizontal flip and colour jitter 0.4. As in BEiT v2's two-picture crop, the
model view (``img_size``, normalised with ``mean``/``std``) and the visual tokenizer's view
(``tokenizer_img_size``, values in [0, 1]) come from the same crop, flip and jitter, so the tokenizer's codes
describe exactly what the model sees.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageEnhance

from beit3.tokenizers.images import sample_crop

# Colour jitter as blends with a degenerate image (black, mean grey, greyscale), done by PIL on uint8 in C:
# the same definitions torchvision's ColorJitter uses on PIL images.
_ENHANCERS = {
    "brightness": ImageEnhance.Brightness,
    "contrast": ImageEnhance.Contrast,
    "saturation": ImageEnhance.Color,
}


class TwoViewTransform:
    """``(PIL RGB image, rng) -> (model view (3, H, W) normalised, tokenizer view (3, h, w) in [0, 1])``."""

    def __init__(
        self,
        img_size: int,
        tokenizer_img_size: int,
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        color_jitter: float = 0.4,
    ) -> None:
        self.img_size, self.tokenizer_img_size = img_size, tokenizer_img_size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.inv_std = 1.0 / np.asarray(std, dtype=np.float32)
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.hflip, self.color_jitter = hflip, color_jitter

    def _jitter_ops(self, rng: np.random.Generator) -> list[tuple[str, float]]:
        cj = self.color_jitter
        if cj <= 0:
            return []
        names = ["brightness", "contrast", "saturation"]
        factors = rng.uniform(1.0 - cj, 1.0 + cj, size=3)
        order = rng.permutation(3)  # random order, as torchvision's ColorJitter
        return [(names[i], float(factors[i])) for i in order]

    def _view(
        self, img: Image.Image, box: tuple[int, int, int, int], size: int, flip: bool, ops
    ) -> np.ndarray:
        left, top, cw, ch = box
        out = img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        for op, factor in ops:
            out = _ENHANCERS[op](out).enhance(factor)
        return np.asarray(out, dtype=np.float32) * (1.0 / 255.0)

    def arrays(self, img: Image.Image, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Both views as float32 numpy arrays (3, H, W), deterministic given ``rng``'s state.

        Numpy rather than torch: per-sample torch ops in a many-threaded process cost more than the work.
        """
        box = sample_crop(img.width, img.height, self.crop_scale, self.crop_ratio, rng)
        flip = bool(rng.random() < self.hflip)
        ops = self._jitter_ops(rng)
        tok = self._view(img, box, self.tokenizer_img_size, flip, ops)
        # Equal sizes share one resize and jitter (the costly part); else each view is resized from the crop.
        same = self.img_size == self.tokenizer_img_size
        model = (tok if same else self._view(img, box, self.img_size, flip, ops)) - self.mean
        model *= self.inv_std
        return np.ascontiguousarray(model.transpose(2, 0, 1)), np.ascontiguousarray(tok.transpose(2, 0, 1))

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views of one random crop of ``img`` (RGB) as tensors (3, H, W)."""
        model, tok = self.arrays(img, rng)
        return torch.from_numpy(model), torch.from_numpy(tok)
