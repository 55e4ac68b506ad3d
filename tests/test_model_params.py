"""Parameter counts of the presets against the released README and the paper's Table 1.

Released sizes (README): base 276M / large 746M with the pretraining heads; the backbone alone must be
220,987,392 exactly for base (torchscale's ``BEiT3`` built with the released config counts that).
Paper giant (Table 1): V-FFN 692M, L-FFN 692M, VL-FFN 52M, shared attention 317M, 1.9B in all. The paper
counts weight matrices only (no biases or norms) and rounds to the nearest unit: ``matrices_only=True``.
"""

from __future__ import annotations

import pytest

from beit3.model import build_model, count_parameters, layer_id_for_lr_decay
from beit3.model.info import format_table
from beit3.model.info import main as model_info_main


def _counts(name: str, **kw) -> dict[str, int]:
    return count_parameters(build_model(name, device="meta"), **kw)


def test_base_backbone_matches_the_released_architecture_exactly():
    counts = _counts("beit3_base_patch16_224")
    assert counts["backbone"] == 220_987_392
    assert round(counts["total"] / 1e6, 1) == 276.5


def test_large_matches_the_released_checkpoint_sizes():
    counts = _counts("beit3_large_patch16_224")
    assert round(counts["backbone"] / 1e6, 1) == 672.7
    assert round(counts["total"] / 1e6, 1) == 746.7


def test_released_layout_has_symmetric_experts_and_no_vl_or_shared_weights():
    counts = _counts("beit3_base_patch16_224")
    assert counts["vision_experts"] == counts["language_experts"]
    assert counts["vl_experts"] == counts["shared_attention"] == counts["other"] == 0
    assert round(counts["word_embeddings"] / 1e6, 1) == 49.2  # 64010 x 768


def test_giant_matches_the_papers_table_in_its_rounding():
    counts = _counts("beit3_giant_patch14_224", matrices_only=True)
    assert round(counts["vision_experts"] / 1e6) == 692
    assert round(counts["language_experts"] / 1e6) == 692
    assert round(counts["vl_experts"] / 1e6) == 52
    assert round(counts["shared_attention"] / 1e6) == 317
    assert round(counts["word_embeddings"] / 1e6) == 90
    assert round(counts["total"] / 1e9, 1) == 1.9
    assert counts["other"] == 0


def test_giant_full_counts_differ_from_matrix_counts_by_biases_and_norms_only():
    full = _counts("beit3_giant_patch14_224")
    matrices = _counts("beit3_giant_patch14_224", matrices_only=True)
    # Per layer and expert: fc1/fc2 biases, the FFN Sub-LN and the final LayerNorm.
    per_expert_layer = 6144 + 1408 + 2 * 6144 + 2 * 1408
    assert full["vision_experts"] - matrices["vision_experts"] == 40 * per_expert_layer + 2 * 1408
    assert full["vl_experts"] - matrices["vl_experts"] == 3 * per_expert_layer


def test_meta_and_real_builds_count_the_same():
    real = count_parameters(build_model("beit3_tiny_paper_patch16_64"))
    assert real == _counts("beit3_tiny_paper_patch16_64")
    assert real["vl_experts"] > 0 and real["shared_attention"] > 0


def test_layer_ids_for_lr_decay_follow_the_released_rule():
    depth = 12
    assert layer_id_for_lr_decay("beit3.text_embed.weight", depth) == 0
    assert layer_id_for_lr_decay("beit3.encoder.embed_positions.A.weight", depth) == 0
    assert layer_id_for_lr_decay("beit3.encoder.layers.0.ffn.A.fc1.weight", depth) == 1
    assert layer_id_for_lr_decay("beit3.encoder.layers.11.self_attn.q_proj.B.bias", depth) == 12
    assert layer_id_for_lr_decay("beit3.encoder.layer_norm.A.weight", depth) == 13
    assert layer_id_for_lr_decay("mlm_head.weight", depth) == 13


def test_no_weight_decay_names_existing_parameters():
    model = build_model("beit3_tiny_patch16_64", device="meta")
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
    assert "beit3.encoder.embed_positions.A.weight" in model.no_weight_decay()


def test_model_info_prints_the_table(capsys):
    assert model_info_main(["beit3_base_patch16_224"]) == 0
    out = capsys.readouterr().out
    assert "220,987,392" in out and "276.5" in out
    assert "matrices (M)" in format_table("beit3_giant_patch14_224")


def test_model_info_without_a_name_lists_models_and_rejects_unknown_ones(capsys):
    assert model_info_main([]) == 0
    assert "beit3_giant_patch14_224" in capsys.readouterr().out
    assert model_info_main(["beit3_nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["beit3_base_patch16_224", "beit3_base_paper_patch16_224"])
def test_every_parameter_falls_in_a_named_group(name):
    assert _counts(name)["other"] == 0
