"""Specification of the model's interface: output shapes per mode, padding, configuration errors, presets."""

from __future__ import annotations

import pytest
import torch

from beit3.model import ModelConfigError, build_model, get_config, list_models

TINY = ("beit3_tiny_patch16_64", "beit3_tiny_paper_patch16_64")
NUM_VISION = (64 // 16) ** 2 + 1  # 16 patches + CLS


def _inputs(batch: int = 2, text_len: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, 64, 64, generator=gen)
    text = torch.randint(3, 64000, (batch, text_len), generator=gen)
    return image, text


@pytest.fixture(scope="module", params=TINY)
def model(request):
    torch.manual_seed(0)
    return build_model(request.param).eval()


@torch.no_grad()
def test_vision_only_output_is_cls_plus_patches(model):
    image, _ = _inputs()
    assert model(image=image).shape == (2, NUM_VISION, 64)


@torch.no_grad()
def test_text_only_output_has_one_state_per_token(model):
    _, text = _inputs(text_len=9)
    assert model(text=text).shape == (2, 9, 64)


@torch.no_grad()
def test_image_text_output_puts_image_tokens_first(model):
    image, text = _inputs(text_len=5)
    fused = model(image=image, text=text)
    assert fused.shape == (2, NUM_VISION + 5, 64)


@torch.no_grad()
def test_pretraining_heads_map_hidden_states_to_vocabularies(model):
    h = torch.randn(3, 64)
    assert model.mlm_head(h).shape == (3, 64010)
    assert model.mim_head(h).shape == (3, 8192)


@torch.no_grad()
def test_image_mask_changes_only_through_the_mask_token(model):
    image, _ = _inputs()
    none_masked = model(image=image, image_mask=torch.zeros(2, 16, dtype=torch.bool))
    assert torch.allclose(none_masked, model(image=image), atol=1e-6)
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, :4] = True
    assert not torch.allclose(model(image=image, image_mask=masked), none_masked, atol=1e-4)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image+text"])
@torch.no_grad()
def test_padding_does_not_change_outputs_at_real_positions(model, with_image):
    image, text = _inputs(text_len=5)
    image = image if with_image else None
    real = model(image=image, text=text)
    junk = torch.randint(3, 64000, (2, 3), generator=torch.Generator().manual_seed(9))
    padded_text = torch.cat([text, junk], dim=1)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[:, 5:] = True
    padded = model(image=image, text=padded_text, text_padding_mask=pad)
    keep = real.shape[1]
    torch.testing.assert_close(padded[:, :keep], real, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_padding_mask_differs_per_sample(model):
    _, text = _inputs(text_len=6)
    pad = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    both = model(text=text, text_padding_mask=pad)
    torch.testing.assert_close(both[1, :3], model(text=text[1:, :3])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[0], model(text=text[:1])[0], rtol=1e-5, atol=1e-5)


def test_forward_rejects_bad_inputs(model):
    image, text = _inputs()
    with pytest.raises(ValueError, match="image, a text, or both"):
        model()
    with pytest.raises(ValueError, match="img_size"):
        model(image=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="shape of text"):
        model(text=text, text_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_text_len"):
        model(text=torch.zeros(1, 65, dtype=torch.long))


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ModelConfigError, match="beit3_base_patch16_224"):
        build_model("beit3_huge_patch16_224")


def test_unknown_override_is_rejected_by_name():
    with pytest.raises(ModelConfigError, match="embed_dimm"):
        build_model("beit3_tiny_patch16_64", embed_dimm=32)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_heads": 3}, "divisible by num_heads"),
        ({"img_size": 70}, "multiple of patch_size"),
        ({"vl_expert_layers": 1}, "layout='paper'"),
        ({"layout": "sideways"}, "layout must be one of"),
        ({"init": "xavier"}, "init must be one of"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"depth": 0}, "depth must be positive"),
    ],
)
def test_invalid_config_values_name_the_fix(overrides, message):
    with pytest.raises(ModelConfigError, match=message):
        get_config("beit3_tiny_patch16_64", **overrides)


def test_paper_layout_rejects_more_vl_layers_than_depth():
    with pytest.raises(ModelConfigError, match="vl_expert_layers must lie"):
        get_config("beit3_tiny_paper_patch16_64", vl_expert_layers=4)


def test_registry_holds_the_released_and_paper_presets():
    names = set(list_models())
    assert {"beit3_base_patch16_224", "beit3_large_patch16_224", "beit3_giant_patch14_224"} <= names
    assert set(TINY) <= names
    giant = get_config("beit3_giant_patch14_224")
    assert (giant.layout, giant.depth, giant.embed_dim, giant.ffn_dim, giant.patch_size) == (
        "paper",
        40,
        1408,
        6144,
        14,
    )
    assert giant.vl_expert_layers == 3


def test_giant_builds_on_the_meta_device_without_memory():
    model = build_model("beit3_giant_patch14_224", device="meta")
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    assert sum(p.numel() for p in params) > 1.8e9
    assert model.beit3.encoder.embed_positions.A.weight.shape == ((224 // 14) ** 2 + 3, 1408)


def test_overrides_change_the_built_model():
    model = build_model("beit3_tiny_patch16_64", img_size=128, pretraining_heads=False)
    assert model.beit3.encoder.embed_positions.A.weight.shape[0] == (128 // 16) ** 2 + 3
    assert model.mlm_head is None and model.mim_head is None
