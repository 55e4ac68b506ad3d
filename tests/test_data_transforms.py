"""Two views of one random-resized crop, flip and colour jitter, implemented without torchvision."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from beit3.pretrain.data.transforms import TwoViewTransform, sample_crop


def gradient_image(width=96, height=64) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def test_crop_area_and_aspect_stay_within_the_configured_ranges():
    rng = np.random.default_rng(0)
    for _ in range(300):
        left, top, cw, ch = sample_crop(200, 150, (0.2, 0.6), (0.75, 4 / 3), rng)
        assert left >= 0 and left + cw <= 200 and top >= 0 and top + ch <= 150
        assert 0.19 <= cw * ch / (200 * 150) <= 0.61
        assert 0.74 <= cw / ch <= 1.35


def test_impossible_crop_falls_back_to_a_centred_crop_within_the_aspect_range():
    left, top, cw, ch = sample_crop(400, 20, (0.9, 1.0), (0.75, 4 / 3), np.random.default_rng(0))
    assert (cw, ch) == (27, 20) and top == 0 and left == (400 - 27) // 2


def test_views_have_their_sizes_and_value_ranges():
    t = TwoViewTransform(32, 48, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    model, tok = t(gradient_image(), np.random.default_rng(0))
    assert model.shape == (3, 32, 32) and tok.shape == (3, 48, 48)
    assert model.dtype == tok.dtype == torch.float32
    assert tok.min() >= 0 and tok.max() <= 1
    assert model.min() >= -1 and model.max() <= 1


def test_both_views_show_the_same_crop_flip_and_jitter():
    t = TwoViewTransform(32, 64, mean=(0, 0, 0), std=(1, 1, 1), crop_scale=(0.2, 0.5))
    for seed in range(5):
        model, tok = t(gradient_image(), np.random.default_rng(seed))
        small = F.interpolate(tok[None], size=32, mode="area")[0]
        assert (small - model).abs().mean() < 0.02


def test_same_generator_state_gives_the_same_views_and_another_differs():
    t = TwoViewTransform(32, 32)
    a = t(gradient_image(), np.random.default_rng(7))
    b = t(gradient_image(), np.random.default_rng(7))
    c = t(gradient_image(), np.random.default_rng(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_hflip_mirrors_the_view():
    fixed = dict(
        crop_scale=(1.0, 1.0), crop_ratio=(1.5, 1.5), color_jitter=0.0, mean=(0, 0, 0), std=(1, 1, 1)
    )
    plain, _ = TwoViewTransform(32, 32, hflip=0.0, **fixed)(gradient_image(), np.random.default_rng(0))
    flipped, _ = TwoViewTransform(32, 32, hflip=1.0, **fixed)(gradient_image(), np.random.default_rng(0))
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-6)
    assert plain[0, :, -1].mean() > plain[0, :, 0].mean()  # red grows to the right before flipping


def test_normalisation_uses_the_configured_mean_and_std():
    fixed = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), color_jitter=0.0, hflip=0.0)
    img = Image.new("RGB", (40, 40), (255, 0, 51))
    model, tok = TwoViewTransform(16, 16, mean=(0.5, 0.2, 0.1), std=(0.25, 0.5, 0.1), **fixed)(
        img, np.random.default_rng(0)
    )
    expected = torch.tensor([(1 - 0.5) / 0.25, (0 - 0.2) / 0.5, (0.2 - 0.1) / 0.1])
    assert torch.allclose(model.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(tok.mean(dim=(1, 2)), torch.tensor([1.0, 0.0, 0.2]), atol=1e-6)


def test_colour_jitter_changes_colours_within_its_strength():
    fixed = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    img = Image.new("RGB", (16, 16), (128, 100, 60))
    base = torch.tensor([128, 100, 60]) / 255
    shifts = []
    for seed in range(40):
        _, tok = TwoViewTransform(8, 8, color_jitter=0.4, **fixed)(img, np.random.default_rng(seed))
        shifts.append((tok.mean(dim=(1, 2)) - base).abs().max().item())
    assert max(shifts) > 0.05  # jitter is on
    assert max(shifts) < 0.4 * 1.0 + 0.05  # and bounded by its strength
    _, tok = TwoViewTransform(8, 8, color_jitter=0.0, **fixed)(img, np.random.default_rng(0))
    assert torch.allclose(tok.mean(dim=(1, 2)), base, atol=1e-6)
