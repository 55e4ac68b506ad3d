"""Modality routing: which expert weights each token's output may depend on, in both layouts.

Released layout: vision tokens go through the ``A`` copies, text tokens through the ``B`` copies.
Paper layout: additionally, the ``C`` (vision-language) FFN experts of the top layers serve image-text input.
"""

from __future__ import annotations

import pytest
import torch

from beit3.model import build_model

RELEASED, PAPER = "beit3_tiny_patch16_64", "beit3_tiny_paper_patch16_64"
NUM_VISION = 17


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(2, 3, 64, 64, generator=gen),
        "text": torch.randint(3, 64000, (2, 6), generator=gen),
    }


@torch.no_grad()
def _outputs(model) -> dict[str, torch.Tensor]:
    x = _inputs()
    return {
        "vision": model(image=x["image"]),
        "text": model(text=x["text"]),
        "fused": model(image=x["image"], text=x["text"]),
    }


@torch.no_grad()
def _perturb(model, selects) -> int:
    """Add noise to every parameter whose name ``selects`` accepts; returns how many were changed."""
    gen = torch.Generator().manual_seed(1)
    changed = 0
    for name, p in model.named_parameters():
        if selects(name):
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
            changed += 1
    return changed


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0, atol=1e-6)


@pytest.fixture(params=[RELEASED, PAPER])
def model(request):
    torch.manual_seed(0)
    return build_model(request.param, pretraining_heads=False).eval()


def test_vision_only_output_ignores_language_experts(model):
    before = _outputs(model)
    assert _perturb(model, lambda n: ".B." in n) > 0
    after = _outputs(model)
    assert _same(after["vision"], before["vision"])
    assert not _same(after["text"], before["text"])


def test_text_only_output_ignores_vision_experts_and_vision_embedding(model):
    before = _outputs(model)
    assert _perturb(model, lambda n: ".A." in n or "vision_embed" in n) > 0
    after = _outputs(model)
    assert _same(after["text"], before["text"])
    assert not _same(after["vision"], before["vision"])


def test_fused_input_routes_the_last_ffn_by_position():
    """After the last attention, tokens no longer mix: the last layer's FFN experts act per position."""
    model = build_model(RELEASED, pretraining_heads=False).eval()
    last = f"encoder.layers.{model.cfg.depth - 1}.ffn"
    before = _outputs(model)["fused"]
    _perturb(model, lambda n: f"{last}.B." in n)
    after_b = _outputs(model)["fused"]
    assert _same(after_b[:, :NUM_VISION], before[:, :NUM_VISION])
    assert not _same(after_b[:, NUM_VISION:], before[:, NUM_VISION:])
    _perturb(model, lambda n: f"{last}.A." in n)
    after_a = _outputs(model)["fused"]
    assert _same(after_a[:, NUM_VISION:], after_b[:, NUM_VISION:])
    assert not _same(after_a[:, :NUM_VISION], after_b[:, :NUM_VISION])


def test_released_layout_decouples_every_attention_projection():
    model = build_model(RELEASED, device="meta")
    keys = {k for k in model.state_dict() if k.startswith("beit3.encoder.layers.0.")}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj", "inner_attn_ln"):
        for expert in "AB":
            assert f"beit3.encoder.layers.0.self_attn.{proj}.{expert}.weight" in keys
    assert "beit3.encoder.layers.0.ffn.A.fc1.weight" in keys  # the whole FFN is the expert
    assert not any(".C." in k for k in model.state_dict())
    assert len(keys) == 40  # as in the released checkpoints: 20 tensors per expert and layer


def test_paper_layout_shares_attention_and_puts_vl_experts_in_top_layers_only():
    model = build_model(PAPER, device="meta")
    cfg = model.cfg
    keys = set(model.state_dict())
    first_vl = cfg.depth - cfg.vl_expert_layers
    for i in range(cfg.depth):
        prefix = f"beit3.encoder.layers.{i}."
        assert prefix + "self_attn.q_proj.weight" in keys
        assert prefix + "self_attn_layer_norm.weight" in keys
        assert (prefix + "ffn.C.fc1.weight" in keys) == (i >= first_vl)
        assert (prefix + "final_layer_norm.C.weight" in keys) == (i >= first_vl)


def test_vl_experts_change_only_image_text_outputs():
    model = build_model(PAPER, pretraining_heads=False).eval()
    before = _outputs(model)
    assert _perturb(model, lambda n: ".C." in n) > 0
    after = _outputs(model)
    assert _same(after["vision"], before["vision"])
    assert _same(after["text"], before["text"])
    assert not _same(after["fused"], before["fused"])


def test_vl_experts_run_in_top_layers_for_image_text_input_only():
    model = build_model(PAPER, pretraining_heads=False).eval()
    calls: list[tuple[str, int]] = []
    mode = {"now": ""}
    for i, layer in enumerate(model.beit3.encoder.layers):
        if layer.ffn.C is not None:
            layer.ffn.C.register_forward_hook(lambda *_, i=i: calls.append((mode["now"], i)))
    x = _inputs()
    with torch.no_grad():
        for mode["now"], kwargs in (
            ("vision", {"image": x["image"]}),
            ("text", {"text": x["text"]}),
            ("fused", x),
        ):
            model(**kwargs)
    top = list(range(model.cfg.depth - model.cfg.vl_expert_layers, model.cfg.depth))
    assert calls == [("fused", i) for i in top]


def test_paper_layout_fused_input_skips_v_and_l_ffn_experts_in_top_layers():
    """In a VL layer the whole image-text sequence goes through C: perturbing that layer's A/B FFN is moot."""
    model = build_model(PAPER, pretraining_heads=False).eval()
    top = model.cfg.depth - 1
    before = _outputs(model)
    _perturb(model, lambda n: f"layers.{top}.ffn.A." in n or f"layers.{top}.ffn.B." in n)
    after = _outputs(model)
    assert _same(after["fused"], before["fused"])
    assert not _same(after["vision"], before["vision"])
