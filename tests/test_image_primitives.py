"""The image primitives every package uses (`beit3.tokenizers.images`): RGB on white, random crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from beit3.finetune.data.sources import DataSourceError, load_image
from beit3.finetune.inference import preprocess_images
from beit3.pretrain.data.decode import SkipSample, decode_image
from beit3.tokenizers.images import (
    NonFiniteImageError,
    load_rgb,
    random_resized_crop,
    sample_crop,
    to_rgb,
)


def _transparent_red_dot() -> Image.Image:
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    img.putpixel((4, 4), (255, 0, 0, 255))
    return img


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparent_pixels_become_white(mode):
    img = _transparent_red_dot()
    rgb = to_rgb(img if mode == "RGBA" else img.convert(mode))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((4, 4)) != (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped_and_nan_is_refused():
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    assert to_rgb(Image.fromarray(arr)).getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(NonFiniteImageError):
        to_rgb(Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)))


def test_every_reader_composites_on_white(tmp_path):
    """Tokenizer training, pretraining data, finetuning data and inference see the same pixels."""
    path = tmp_path / "dot.png"
    _transparent_red_dot().save(path)
    reference = np.asarray(to_rgb(_transparent_red_dot()))
    assert np.array_equal(np.asarray(load_rgb(path)), reference)
    assert np.array_equal(np.asarray(decode_image(path.read_bytes())), reference)
    from_file = load_image(path, 8)
    assert torch.equal(from_file, torch.from_numpy(reference.copy()).permute(2, 0, 1))
    assert torch.equal(preprocess_images([_transparent_red_dot()], 8), preprocess_images([path], 8))


def test_a_nan_image_is_a_counted_skip_in_pretraining_and_a_named_error_in_finetuning(tmp_path):
    path = tmp_path / "nan.tiff"
    Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)).save(path)
    with pytest.raises(SkipSample) as err:
        decode_image(path.read_bytes())
    assert err.value.kind == "image_nonfinite"
    with pytest.raises(DataSourceError, match="NaN"):
        load_image(path, 4)


def test_random_resized_crop_resizes_the_sampled_box():
    img = Image.fromarray(np.arange(60 * 40 * 3, dtype=np.uint8).reshape(40, 60, 3))
    box = sample_crop(60, 40, (0.2, 0.6), (3 / 4, 4 / 3), np.random.default_rng(3))
    out = random_resized_crop(img, 16, np.random.default_rng(3), (0.2, 0.6), hflip=0.0)
    left, top, cw, ch = box
    expected = img.resize((16, 16), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    assert np.array_equal(np.asarray(out), np.asarray(expected))
