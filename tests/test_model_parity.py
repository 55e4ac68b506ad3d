"""Parity with the reference implementation, torchscale 0.3.0 ``BEiT3`` (the released architecture).

The reference is built as the released ``BEiT3Wrapper`` builds it (multiway, no embedding LayerNorm,
normalized output, no output layer, vocabulary 64010), with tiny sizes and 64 px images. Its weights (keys
are ours without ``beit3.``) are set to random values, LayerNorms included, and copied into our
released-layout model; the outputs must then agree to a relative error of 1e-5.

Needs ``.cache/reference`` (``bash scripts/install.sh --tests``): a missing reference fails under CI=true
and skips with the install command otherwise.
"""

from __future__ import annotations

import pytest
import torch
from reference_impl import (
    INSTALL_HINT,
    ReferenceUnavailable,
    build_reference,
    copy_reference_into,
    randomize_,
    reference_available,
    reference_forward,
    running_in_ci,
)

from beit3.model import BEiT3Model, get_config

TOLERANCE = 1e-5


def _config():
    # Tiny dimensions, the released vocabulary and text position table (1024 rows, torchscale's default).
    return get_config("beit3_tiny_patch16_64", depth=3, max_text_positions=1024, pretraining_heads=False)


@pytest.fixture(scope="module")
def pair():
    if not reference_available():
        message = f"reference implementation missing: {INSTALL_HINT}"
        if running_in_ci():
            pytest.fail(message)
        pytest.skip(message)
    try:
        reference = build_reference(_config()).eval()
    except ReferenceUnavailable as e:  # pragma: no cover - guarded above
        pytest.fail(str(e))
    randomize_(reference, seed=0)
    ours = BEiT3Model(_config()).eval()
    copy_reference_into(ours, reference)
    return ours, reference


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    pad[2, 2:] = True
    return {
        "image": torch.randn(3, 3, 64, 64, generator=gen),
        "text": torch.randint(0, 64010, (3, 9), generator=gen),
        "text_padding_mask": pad,
        "image_mask": torch.rand(3, 16, generator=gen) < 0.4,
    }


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


def _compare(pair, **inputs) -> None:
    ours, reference = pair
    with torch.no_grad():
        a = ours(**inputs)
        b = reference_forward(reference, **inputs)
    assert a.shape == b.shape
    assert _relative_error(a, b) <= TOLERANCE


def test_state_dict_keys_are_the_references_with_the_beit3_prefix(pair):
    ours, reference = pair
    ref_shapes = {f"beit3.{k}": tuple(v.shape) for k, v in reference.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes


def test_vision_only_matches(pair):
    _compare(pair, image=_inputs()["image"])


def test_text_only_with_padding_matches(pair):
    x = _inputs()
    _compare(pair, text=x["text"], text_padding_mask=x["text_padding_mask"])


def test_image_text_with_padding_matches(pair):
    x = _inputs()
    _compare(pair, image=x["image"], text=x["text"], text_padding_mask=x["text_padding_mask"])


def test_masked_image_modeling_input_matches(pair):
    x = _inputs()
    _compare(pair, image=x["image"], image_mask=x["image_mask"])
    _compare(pair, **x)


def test_attention_mask_matches(pair):
    """Released semantics: a nonzero entry blocks; here text attends causally and the image not to text."""
    x = _inputs()
    nv, nt = 17, 9
    blocked = torch.zeros(nv + nt, nv + nt)
    blocked[:nv, nv:] = 1
    blocked[nv:, nv:] = torch.ones(nt, nt).triu(1)
    ours, reference = pair
    with torch.no_grad():
        a = ours(image=x["image"], text=x["text"], attn_mask=blocked.bool())
        b = reference_forward(reference, image=x["image"], text=x["text"], attn_mask=blocked)
    assert _relative_error(a, b) <= TOLERANCE


def test_gradients_match(pair):
    ours, reference = pair
    x = _inputs()
    for model in (ours, reference):
        model.zero_grad(set_to_none=True)
    ours(**x).square().mean().backward()
    reference_forward(reference, **x).square().mean().backward()
    ref_grads = dict(reference.named_parameters())
    for name, p in ours.beit3.named_parameters():
        g_ref = ref_grads[name].grad
        assert g_ref is not None, name
        assert _relative_error(p.grad, g_ref) <= 1e-4, name
