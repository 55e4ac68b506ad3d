"""KV cache: decoding step by step with the cache equals one full forward under a causal attention mask."""

from __future__ import annotations

import pytest
import torch

from beit3.model import KVCache, build_model

TINY = ("beit3_tiny_patch16_64", "beit3_tiny_paper_patch16_64")
NV = 17  # image tokens of a 64 px image (16 patches + CLS)


def _causal(num_text: int, num_vision: int = 0) -> torch.Tensor:
    """Released semantics (True = blocked): image sees image only, text sees the image and earlier text."""
    total = num_vision + num_text
    blocked = torch.zeros(total, total, dtype=torch.bool)
    blocked[:num_vision, num_vision:] = True
    blocked[num_vision:, num_vision:] = torch.ones(num_text, num_text, dtype=torch.bool).triu(1)
    return blocked


@pytest.fixture(scope="module", params=TINY)
def model(request):
    torch.manual_seed(0)
    return build_model(request.param, pretraining_heads=False).eval()


def _data(text_len: int = 6):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 64, 64, generator=gen), torch.randint(3, 64000, (2, text_len), generator=gen)


@torch.no_grad()
def test_token_by_token_text_decoding_equals_a_causal_forward(model):
    _, text = _data()
    full = model(text=text, attn_mask=_causal(6))
    cache = model.new_cache()
    steps = [model(text=text[:, i : i + 1], cache=cache) for i in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert (len(cache), cache.num_vision, cache.num_text) == (6, 0, 6)


@torch.no_grad()
def test_image_then_text_decoding_equals_a_causal_image_text_forward(model):
    """The image is fed with the first text token, so the paper layout's VL experts see an image-text pair."""
    image, text = _data()
    mask = _causal(6, NV)
    full = model(image=image, text=text, attn_mask=mask)
    cache = model.new_cache()
    steps = [model(image=image, text=text[:, :1], attn_mask=mask[: NV + 1, : NV + 1], cache=cache)]
    steps += [model(text=text[:, i : i + 1], cache=cache) for i in range(1, 6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert (cache.num_vision, cache.num_text) == (NV, 6)


@torch.no_grad()
def test_explicit_positions_and_truncate_support_the_mask_slot_recipe(model):
    """Captioning feeds [token, <mask>] each step and forgets the <mask> slot; positions stay consistent."""
    _, text = _data()
    cache = model.new_cache()
    model(text=text[:, :3], attn_mask=_causal(3), cache=cache)
    mask_id = torch.full((2, 1), 5)
    pair = torch.cat([text[:, 3:4], mask_id], dim=1)
    blocked = torch.zeros(2, 5, dtype=torch.bool)
    blocked[0, 4] = True
    model(text=pair, attn_mask=blocked, text_positions=torch.tensor([5, 6]), cache=cache)
    cache.truncate(4)
    assert (len(cache), cache.num_text) == (4, 4)
    # The next step continues at text position 4 (+2 offset) without being told.
    nxt = model(text=text[:, 4:5], cache=cache)
    full = model(text=text[:, :5], attn_mask=_causal(5))
    torch.testing.assert_close(nxt[:, 0], full[:, 4], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_reorder_follows_beams(model):
    _, text = _data()
    cache = model.new_cache()
    model(text=text[:, :2], attn_mask=_causal(2), cache=cache)
    cache.reorder(torch.tensor([1, 1]))
    step = model(text=text[1:2, 2:3].expand(2, 1), cache=cache)
    full = model(text=text[1:2, :3], attn_mask=_causal(3))
    torch.testing.assert_close(step[:, 0], full[:, 2].expand(2, -1), rtol=1e-5, atol=1e-5)


def test_image_after_cached_tokens_is_rejected(model):
    image, text = _data()
    cache = model.new_cache()
    with torch.no_grad():
        model(text=text[:, :1], cache=cache)
        with pytest.raises(ValueError, match="first step"):
            model(image=image, cache=cache)


def test_empty_cache_has_no_positions():
    cache = KVCache(3)
    assert len(cache) == 0 and cache.num_text == cache.num_vision == 0
