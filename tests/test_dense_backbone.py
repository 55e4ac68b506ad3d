"""The vision encoder as a dense-prediction backbone: pyramid shapes, window attention, positions, reload."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from beit3.engine.config_io import from_dict, section_problem
from beit3.finetune.configurations import build_encoder, full_model_keys
from beit3.finetune.dense.backbone import (
    BackboneSettings,
    DenseBackbone,
    DenseBackboneError,
    default_global_layers,
    window_sizes,
)
from beit3.finetune.reload import load_pretrained
from beit3.model import build_model, build_param_groups, save_checkpoint
from beit3.model.layers import WindowGrid

SMALL = {"vocab_size": 40, "max_text_positions": 20}  # keep the tiny text tables tiny
RELEASED, PAPER = "beit3_tiny_patch16_64", "beit3_tiny_paper_patch16_64"
PATCH14 = {"patch_size": 14, "img_size": 56}  # the giant's patch size on the tiny preset (4 x 4 grid)
LAYOUTS = {
    "released": (RELEASED, {}),
    "paper": (PAPER, {}),
    "released-patch14": (RELEASED, PATCH14),
    "paper-patch14": (PAPER, PATCH14),
}


def _encoder(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_encoder(name, "vision", **SMALL, **overrides)


def _images(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def backbone(request):
    name, overrides = LAYOUTS[request.param]
    return DenseBackbone(_encoder(name, **overrides), out_channels=24, window_size=2).eval()


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 2), (7, 3)])
def test_pyramid_has_strides_4_to_32_of_the_patch_grid_for_any_input_size(backbone, grid):
    p = backbone.cfg.patch_size
    rows, cols = grid
    with torch.no_grad():
        feats = backbone(_images(2, rows * p, cols * p))
    assert list(feats) == ["p2", "p3", "p4", "p5"]
    expected = {
        "p2": (4 * rows, 4 * cols),
        "p3": (2 * rows, 2 * cols),
        "p4": grid,
        "p5": (rows // 2, cols // 2),
    }
    assert {k: tuple(v.shape) for k, v in feats.items()} == {k: (2, 24, *s) for k, s in expected.items()}
    assert backbone.out_channels == 24
    assert backbone.strides == {"p2": p / 4, "p3": p / 2, "p4": p, "p5": 2 * p}
    assert backbone.size_divisibility == 2 * p
    assert all(torch.isfinite(v).all() for v in feats.values())


@pytest.mark.parametrize("name", [RELEASED, PAPER])
def test_global_grid_at_the_model_size_is_the_encoders_patch_output(name):
    encoder = _encoder(name).eval()
    image = _images(2, 64, 64)
    with torch.no_grad():
        grid = encoder.beit3.forward_grid(image)[0]  # (B, D, 4, 4)
        tokens = encoder(image=image)[:, 1:]  # CLS dropped
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), tokens, rtol=0, atol=1e-6)


def _reference_window_attention(q, k, v, rows, cols, size, num_cls):
    """Plain masked attention over the whole sequence: a patch may attend to the patches of its window and
    the leading tokens; a leading token to everything."""
    r = torch.arange(rows * cols) // cols
    c = torch.arange(rows * cols) % cols
    window = (r // size) * cols + (c // size)
    same = window[:, None] == window[None, :]
    t = num_cls + rows * cols
    allowed = torch.ones(t, t, dtype=torch.bool)
    allowed[num_cls:, num_cls:] = same
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("rows,cols,size,num_cls", [(5, 7, 3, 1), (4, 6, 2, 0), (3, 3, 4, 1)])
def test_window_attention_matches_masked_global_attention(rows, cols, size, num_cls):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, num_cls + rows * cols, 8, generator=g) for _ in range(3))
    out = WindowGrid(rows, cols, size, num_cls).attention(q, k, v)
    ref = _reference_window_attention(q, k, v, rows, cols, size, num_cls)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls_token", [True, False])
@pytest.mark.parametrize("name", [RELEASED, PAPER])
def test_window_covering_the_grid_equals_global_attention_and_a_smaller_one_differs(name, cls_token):
    encoder = _encoder(name).eval()
    image = _images(2, 48, 80)  # a 3 x 5 grid
    depth = encoder.cfg.depth

    def grid(window: int) -> torch.Tensor:
        with torch.no_grad():
            return encoder.beit3.forward_grid(image, [window] * depth, cls_token=cls_token)[0]

    full = grid(0)
    torch.testing.assert_close(grid(5), full, rtol=1e-5, atol=1e-5)  # one window, 3 x 5 real + padding
    torch.testing.assert_close(grid(8), full, rtol=1e-5, atol=1e-5)
    assert (grid(2) - full).abs().max() > 1e-2


def test_position_table_is_resized_bicubically_to_the_input_grid():
    encoder = _encoder(RELEASED).eval()
    b3 = encoder.beit3
    image = _images(1, 80, 48)  # 5 x 3 grid; the table is 4 x 4
    seen = {}

    def record(module, args) -> None:  # the first layer's input: embeddings plus positions
        seen["x"] = args[0]

    hook = b3.encoder.layers[0].register_forward_pre_hook(record)
    with torch.no_grad():
        b3.forward_grid(image, cls_token=True)
    hook.remove()
    table = b3.encoder.embed_positions.A.weight.detach()  # rows 0, 1 unused, 2 CLS, 3: the 4 x 4 grid
    square = table[3:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(square, size=(5, 3), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    patches = b3.vision_embed.proj(image).flatten(2).transpose(1, 2)
    torch.testing.assert_close(seen["x"][:, 1:], patches + ref, rtol=1e-5, atol=1e-6)
    cls = b3.vision_embed.cls_token[0, 0] + table[2]
    torch.testing.assert_close(seen["x"][0, 0], cls)


def test_out_layers_feed_each_level_from_its_own_layer():
    encoder = _encoder(PAPER).eval()  # 3 layers
    backbone = DenseBackbone(encoder, out_channels=16, out_layers=(0, 1, 0, 2)).eval()
    image = _images(2, 64, 96)
    with torch.no_grad():
        feats = backbone(image)
        grids = encoder.beit3.forward_grid(image, out_layers=[0, 1, 2])
        ref = backbone.pyramid([grids[0], grids[1], grids[0], grids[2]])
    for level in feats:
        torch.testing.assert_close(feats[level], ref[level])
    assert (grids[0] - grids[2]).abs().max() > 1e-2


@pytest.mark.parametrize(
    "kwargs",
    [{"window_size": 2}, {"out_layers": (0, 0, 1, 1), "cls_token": False}, {"out_layers": (0, 1, 1, 1)}],
)
def test_every_parameter_gets_a_gradient_and_unused_parts_are_pruned(kwargs):
    """As the finetuning configurations: under ZeRO-3 a parameter without a gradient would drift."""
    backbone = DenseBackbone(_encoder(PAPER), out_channels=8, **kwargs)  # 3 layers
    sum(f.square().mean() for f in backbone(_images(1, 48, 64)).values()).backward()
    missing = [n for n, p in backbone.named_parameters() if p.grad is None]
    assert missing == []
    names = set(dict(backbone.named_parameters()))
    top = max(kwargs.get("out_layers", [2]))
    assert any(f"encoder.layers.{top}." in n for n in names) and not any(
        f"layers.{top + 1}." in n for n in names
    )
    assert ("beit3.encoder.layer_norm.A.weight" in names) == (top == 2)
    assert ("beit3.vision_embed.cls_token" in names) == kwargs.get("cls_token", True)


def test_reload_reports_the_pyramid_as_fresh_and_the_language_experts_as_unused(tmp_path):
    torch.manual_seed(3)
    full = build_model(RELEASED, **SMALL)
    save_checkpoint(full, tmp_path / "pretrained.pth")
    backbone = DenseBackbone(_encoder(RELEASED), out_channels=16, window_size=2)
    report = load_pretrained(backbone, tmp_path / "pretrained.pth", full_model_keys(RELEASED, **SMALL))
    own = backbone.state_dict()
    assert sorted(report.fresh) == sorted(k for k in own if k.startswith("pyramid."))
    assert report.fresh and "initialised fresh" in str(report)
    assert {"mim_head.weight", "mlm_head.weight", "beit3.encoder.layers.0.ffn.B.fc1.weight"} <= set(
        report.unused
    )
    assert sorted(report.loaded) == sorted(k for k in own if k.startswith("beit3."))
    reference = full.state_dict()
    assert all(torch.equal(own[k], reference[k]) for k in report.loaded)
    pruned = DenseBackbone(_encoder(RELEASED), out_channels=16, out_layers=(0, 0, 0, 0), cls_token=False)
    report = load_pretrained(pruned, tmp_path / "pretrained.pth", full_model_keys(RELEASED, **SMALL))
    dropped = {"beit3.encoder.layers.1.ffn.A.fc1.weight", "beit3.encoder.layer_norm.A.weight"}
    assert dropped | {"beit3.vision_embed.cls_token"} <= set(report.unused)


def test_layer_decay_groups_cover_every_parameter_and_give_the_pyramid_the_top_rate():
    backbone = DenseBackbone(_encoder(PAPER), out_channels=16)  # depth 3
    groups = build_param_groups(
        backbone.named_parameters(),
        depth=3,
        weight_decay=0.05,
        layer_decay=0.5,
        no_weight_decay=backbone.no_weight_decay(),
    )
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(backbone.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(named) == len(scale)
    pyramid = [n for n in named if n.startswith("pyramid.")]
    assert pyramid and all(scale[id(named[n])] == 1.0 for n in pyramid)
    assert scale[id(named["beit3.encoder.layers.2.ffn.A.fc1.weight"])] == 0.5
    assert scale[id(named["beit3.encoder.layers.0.ffn.A.fc1.weight"])] == 0.5**3
    assert scale[id(named["beit3.vision_embed.proj.weight"])] == 0.5**4


@pytest.mark.parametrize("part", ["layer", "attention"])
def test_activation_checkpointing_gives_equal_gradients(part):
    image = _images(2, 48, 80)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        backbone = DenseBackbone(_encoder(RELEASED, drop_path_rate=0.2), out_channels=16, windows=[2, 0])
        backbone.set_grad_checkpointing(checkpointing, part=part)
        torch.manual_seed(7)  # the same drop-path draws
        loss = sum(f.square().mean() for f in backbone(image).values())
        loss.backward()
        return {n: p.grad for n, p in backbone.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys() and "beit3.encoder.layers.0.self_attn.q_proj.A.weight" in plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"windows": [2, 0]},
        {"windows": [3, 3], "cls_token": False},
        {"out_layers": (0, 0, 0, 0), "windows": [0, 2]},
    ],
)
def test_training_flops_equal_torchs_count(kwargs):
    """Forward and backward on SDPA's math kernel (counted on CPU): equal, not close."""
    backbone = DenseBackbone(_encoder(RELEASED), out_channels=16, **kwargs)
    image = _images(2, 48, 80)  # 3 x 5 grid: padded windows
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        sum(f.square().mean() for f in backbone(image).values()).backward()
    assert backbone.training_flops(2, 48, 80) == counter.get_total_flops()


def test_recipe_settings_build_the_backbone_they_describe():
    settings = from_dict(
        BackboneSettings, {"window_size": 2, "global_layers": [1], "out_layers": [0, 0, 1, 1]}
    )
    assert settings.problem(depth=2) is None
    backbone = settings.build(_encoder(RELEASED), out_channels=8)
    assert backbone.windows == [2, 0] and backbone.out_layers == [0, 0, 1, 1] and backbone.cls_token
    assert "seg.backbone.global_layers [2]" in BackboneSettings(global_layers=[2]).problem(2, "seg.backbone")
    assert "out_layers" in BackboneSettings(out_layers=[0, 1]).problem(2)
    assert "window_size" in section_problem(BackboneSettings(window_size=-1))


def test_window_settings_per_layer():
    assert default_global_layers(12) == [2, 5, 8, 11]
    assert default_global_layers(24) == [5, 11, 17, 23]
    assert window_sizes(4, 3, [1]) == [3, 0, 3, 3]
    assert window_sizes(4, 0, None) == [0, 0, 0, 0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"window_size": -1}, "window_size"),
        ({"window_size": 2, "global_layers": [5]}, "global_layers"),
        ({"windows": [2]}, "one size"),
        ({"out_layers": (0, 1)}, "four layer indices"),
        ({"out_channels": 0}, "out_channels"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(DenseBackboneError, match=match):
        DenseBackbone(_encoder(RELEASED), **kwargs)


def test_inputs_the_backbone_cannot_take_are_refused():
    backbone = DenseBackbone(_encoder(RELEASED), out_channels=16)
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        backbone(_images(1, 64, 72))
    with pytest.raises(ValueError, match="at least 32"):
        backbone(_images(1, 16, 64))
    with pytest.raises(DenseBackboneError, match="vision encoder"):
        DenseBackbone(build_encoder(RELEASED, "language", **SMALL))
