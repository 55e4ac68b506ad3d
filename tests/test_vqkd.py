"""VQ-KD tokenizer: released key layout and strict loading, code shapes, determinism, the frozen wrapper,
position interpolation and the alignment of codes with the patches of a patch-14 model."""

from __future__ import annotations

import warnings

import pytest
import torch

from beit3.tokenizers.vit import resize_pos_embed
from beit3.tokenizers.vqkd import (
    VisualTokenizer,
    VQKDConfigError,
    build_visual_tokenizer,
    build_vqkd,
    get_vqkd_config,
    list_vqkd,
    load_vqkd_checkpoint,
    precompute_codes,
    save_vqkd_checkpoint,
)

TINY = "vqkd_tiny_patch16_64"


def released_layout(
    depth_dec: int, teacher_dim: int, dim=768, depth_enc=12, grid=14, codes=8192, code_dim=32
):
    """Key -> shape of a released BEiT v2 tokenizer checkpoint, written out from the release's structure
    (beit3.md §8.1): BEiT ViT encoder/decoder with q/v biases and fc_norm, task layers, NormEMA quantizer."""
    layout = {}

    def vit(prefix, depth, in_chans, patch, n_tokens):
        layout[f"{prefix}.cls_token"] = (1, 1, dim)
        layout[f"{prefix}.pos_embed"] = (1, n_tokens + 1, dim)
        layout[f"{prefix}.patch_embed.proj.weight"] = (dim, in_chans, patch, patch)
        layout[f"{prefix}.patch_embed.proj.bias"] = (dim,)
        for i in range(depth):
            b = f"{prefix}.blocks.{i}"
            layout.update({f"{b}.norm1.weight": (dim,), f"{b}.norm1.bias": (dim,)})
            layout.update({f"{b}.attn.q_bias": (dim,), f"{b}.attn.v_bias": (dim,)})
            layout[f"{b}.attn.qkv.weight"] = (3 * dim, dim)
            layout.update({f"{b}.attn.proj.weight": (dim, dim), f"{b}.attn.proj.bias": (dim,)})
            layout.update({f"{b}.norm2.weight": (dim,), f"{b}.norm2.bias": (dim,)})
            layout.update({f"{b}.mlp.fc1.weight": (4 * dim, dim), f"{b}.mlp.fc1.bias": (4 * dim,)})
            layout.update({f"{b}.mlp.fc2.weight": (dim, 4 * dim), f"{b}.mlp.fc2.bias": (dim,)})
        layout.update({f"{prefix}.fc_norm.weight": (dim,), f"{prefix}.fc_norm.bias": (dim,)})

    vit("encoder", depth_enc, 3, 16, grid * grid)
    vit("decoder", depth_dec, code_dim, 1, grid * grid)
    layout["quantize.embedding.weight"] = (codes, code_dim)
    layout["quantize.cluster_size"] = (codes,)
    layout["quantize.embedding.cluster_size"] = (codes,)
    layout["quantize.embedding.embed_avg"] = (codes, code_dim)
    layout["quantize.embedding.initted"] = (1,)
    for name, out in (("encode_task_layer", code_dim), ("decode_task_layer", teacher_dim)):
        layout.update({f"{name}.0.weight": (dim, dim), f"{name}.0.bias": (dim,)})
        layout.update({f"{name}.2.weight": (out, dim), f"{name}.2.bias": (out,)})
    return layout


@pytest.mark.parametrize(
    "name,depth_dec,teacher_dim",
    [
        ("vqkd_encoder_base_decoder_1x768x12_clip", 1, 512),
        ("vqkd_encoder_base_decoder_3x768x12_clip", 3, 512),
        ("vqkd_encoder_base_decoder_1x768x12_dino", 1, 768),
    ],
)
def test_released_configs_have_the_released_keys_and_shapes(name, depth_dec, teacher_dim):
    model = build_vqkd(name, device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == released_layout(depth_dec, teacher_dim)


def test_released_layout_checkpoint_loads_strictly_and_drops_teacher_keys():
    name = "vqkd_encoder_base_decoder_1x768x12_clip"
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, shape in released_layout(1, 512).items()}
    # The release stores the teacher and the loss/scaling helpers beside the tokenizer.
    sd["teacher_model.visual.proj"] = torch.randn(768, 512)
    sd["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    sd["loss_fn.weight"] = torch.zeros(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = build_visual_tokenizer(name)
    load_vqkd_checkpoint(tok.model, {"model": sd})
    loaded = tok.model.state_dict()
    assert all(torch.equal(loaded[k], sd[k]) for k in loaded)
    codes = tok.codes(torch.rand(1, 3, 224, 224))
    assert codes.shape == (1, 196) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 8192


def test_checkpoint_file_round_trip_gives_identical_codes(tmp_path):
    a = build_vqkd(TINY, seed=1)
    save_vqkd_checkpoint(a, tmp_path / "tok.pth")
    assert set(torch.load(tmp_path / "tok.pth", weights_only=True)) == {"model"}
    tok = build_visual_tokenizer(TINY, tmp_path / "tok.pth")
    images = torch.rand(4, 3, 64, 64)
    assert torch.equal(tok.codes(images), a.get_codebook_indices(images))


def test_checkpoint_without_release_leftovers_loads():
    a = build_vqkd(TINY, seed=1)
    sd = {
        k: v
        for k, v in a.state_dict().items()
        if not k.startswith(("quantize.embedding.cluster", "quantize.embedding.e"))
    }
    b = build_vqkd(TINY, seed=2)
    load_vqkd_checkpoint(b, {"model": sd})
    assert torch.equal(b.quantize.embedding.weight, a.quantize.embedding.weight)


def test_checkpoint_of_another_config_is_rejected_with_the_fix():
    sd = build_vqkd(TINY).state_dict()
    with pytest.raises(VQKDConfigError, match="registry name"):
        load_vqkd_checkpoint(build_vqkd("vqkd_small_patch16_64"), {"model": sd})
    del sd["encoder.fc_norm.weight"]
    with pytest.raises(VQKDConfigError, match="Missing"):
        load_vqkd_checkpoint(build_vqkd(TINY), {"model": sd})


def test_unknown_name_and_bad_override_are_errors():
    with pytest.raises(VQKDConfigError, match="known"):
        get_vqkd_config("vqkd_nope")
    with pytest.raises(VQKDConfigError, match="override"):
        get_vqkd_config(TINY, codebook_sise=3)
    assert TINY in list_vqkd()


def test_random_tokenizer_warns_that_it_is_for_smoke_tests():
    with pytest.warns(UserWarning, match="smoke tests"):
        build_visual_tokenizer(TINY)


def test_same_seed_same_codes_and_codes_in_range():
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b, c = build_vqkd(TINY, seed=3), build_vqkd(TINY, seed=3), build_vqkd(TINY, seed=4)
    ca = a.get_codebook_indices(images)
    assert ca.shape == (5, 16) and ca.dtype == torch.long and ca.min() >= 0 and ca.max() < 1024
    assert torch.equal(ca, b.get_codebook_indices(images))
    assert not torch.equal(ca, c.get_codebook_indices(images))


def test_images_in_unit_range_reach_the_encoder_in_minus_one_one():
    model = build_vqkd(TINY)
    seen = {}
    model.encoder.patch_embed.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    images = torch.rand(2, 3, 64, 64)
    model.get_codebook_indices(images)
    assert torch.allclose(seen["x"], images * 2 - 1)


def test_codes_are_nearest_unit_codes_of_the_encoder_output():
    model = build_vqkd(TINY)
    images = torch.rand(3, 3, 64, 64)
    z = torch.nn.functional.normalize(model.encode(images), dim=-1)
    dist = torch.cdist(z, model.quantize.embedding.weight[None].expand(3, -1, -1))
    assert torch.equal(model.get_codebook_indices(images), dist.argmin(-1))


def test_visual_tokenizer_is_frozen_and_batching_does_not_change_codes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = build_visual_tokenizer(TINY)
    tok.train()
    assert not tok.model.training and not any(p.requires_grad for p in tok.parameters())
    assert tok.grid == (4, 4) and tok.codebook_size == 1024 and tok.input_size == 64
    images = torch.rand(7, 3, 64, 64)
    small = VisualTokenizer(tok.model, batch_size=2)
    assert torch.equal(tok.codes(images), small.codes(images))


def test_visual_tokenizer_rejects_the_wrong_view_size():
    tok = VisualTokenizer(build_vqkd(TINY))
    with pytest.raises(VQKDConfigError, match="tokenizer_img_size"):
        tok.codes(torch.rand(1, 3, 96, 96))


def test_other_input_sizes_interpolate_positions():
    tok = VisualTokenizer(build_vqkd(TINY), input_size=96)
    assert tok.grid == (6, 6) and tok.codes(torch.rand(2, 3, 96, 96)).shape == (2, 36)
    table = torch.randn(1, 17, 8)
    assert torch.equal(resize_pos_embed(table, (4, 4)), table)
    big = resize_pos_embed(table, (8, 8))
    assert big.shape == (1, 65, 8) and torch.equal(big[:, 0], table[:, 0])
    # A constant table stays constant under bicubic resizing.
    const = torch.ones(1, 17, 8)
    assert torch.allclose(resize_pos_embed(const, (7, 7)), torch.ones(1, 50, 8), atol=1e-5)


def test_patch14_grid_codes_align_with_model_patches():
    """A 256 px tokenizer view of a crop gives 16x16 codes; code k must describe the same image region as
    patch k of the 224 px patch-14 model view. With attention and positions removed, a code depends only
    on its own patch, so shuffling the 16x16 cells of the crop must shuffle the codes the same way, and
    cells that look alike must get the same code."""
    model = build_vqkd(TINY, encoder_depth=0, seed=0)
    with torch.no_grad():
        model.encoder.pos_embed.zero_()
    tok = VisualTokenizer(model, input_size=256)
    assert tok.grid == (16, 16)
    g = torch.Generator().manual_seed(0)
    colours = torch.rand(16 * 16, 3, generator=g)
    colours[100] = colours[7]  # two cells alike

    def crop(cell_colours, px):  # an image of 16x16 uniform cells, px pixels per cell
        grid = cell_colours.t().reshape(3, 16, 16)
        return grid.repeat_interleave(px, 1).repeat_interleave(px, 2)[None]

    codes = tok.codes(crop(colours, 16))[0]
    perm = torch.randperm(256, generator=g)
    shuffled = tok.codes(crop(colours[perm], 16))[0]
    assert codes.unique().numel() > 20  # not a constant map, which any permutation would leave unchanged
    assert torch.equal(shuffled, codes[perm])
    assert codes[100] == codes[7]
    # The model's patch-14 view of the crop: patch k (row-major, as Conv2d + flatten) is cell k.
    view224 = crop(colours, 14)[0]
    patches = view224.unfold(1, 14, 14).unfold(2, 14, 14)  # (3, 16, 16, 14, 14)
    assert torch.allclose(patches.mean((-1, -2)).reshape(3, 256).t(), colours)
    assert torch.equal(patches.amax((-1, -2)), patches.amin((-1, -2)))  # each patch is one cell


def test_precompute_codes_matches_direct_codes():
    tok = VisualTokenizer(build_vqkd(TINY))
    images = torch.rand(10, 3, 64, 64)
    dataset = [(img, i) for i, img in enumerate(images)]  # (image, label) items as a Dataset yields
    assert torch.equal(precompute_codes(tok, dataset, batch_size=4), tok.codes(images))
    assert torch.equal(precompute_codes(tok, images.split(3)), tok.codes(images))


@pytest.mark.parametrize("name", ["vqkd_encoder_base_decoder_3x768x12_clip"])
def test_base_tokenizer_gives_196_codes_at_224_and_256_at_256(name):
    model = build_vqkd(name)
    assert VisualTokenizer(model).codes(torch.rand(1, 3, 224, 224)).shape == (1, 196)
    assert VisualTokenizer(model, input_size=256).codes(torch.rand(1, 3, 256, 256)).shape == (1, 256)


def test_the_frozen_tokenizer_keeps_the_encoder_only_and_gives_the_same_codes():
    model = build_vqkd(TINY)
    images = torch.rand(3, 3, 64, 64)
    full = VisualTokenizer(model).codes(images)
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}}
    tok = build_visual_tokenizer(TINY, state)
    names = {name for name, _ in tok.named_parameters()}
    assert names and not any(".decoder." in n or "decode_task_layer" in n for n in names)
    assert sum(p.numel() for p in tok.parameters()) < sum(p.numel() for p in model.parameters())
    assert torch.equal(tok.codes(images), full)
    with pytest.raises(VQKDConfigError, match="encoder-only"):
        tok.model.decode(torch.zeros(1, 16, tok.model.cfg.code_dim), (4, 4))
