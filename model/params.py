"""Parameter accounting and optimizer conventions that depend only on parameter names."""

from __future__ import annotations

import re

from torch import nn

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def parameter_group(name: str) -> str:
    """The accounting group of a parameter, from its name.

    ``vision_experts`` / ``language_experts`` / ``vl_experts`` are the A / B / C copies of Multiway modules
    (in the released layout this includes the decoupled attention projections); ``shared_attention`` is the
    paper layout's shared attention (projections and its LayerNorms); ``word_embeddings`` the text
    embedding; ``heads`` the pretraining heads; ``embeddings`` the patch embedding, tokens and positions.
    """
    if name.startswith(("mlm_head.", "mim_head.")):
        return "heads"
    if "text_embed" in name:
        return "word_embeddings"
    if "vision_embed" in name or "embed_positions" in name:
        return "embeddings"
    if ".A." in name:
        return "vision_experts"
    if ".B." in name:
        return "language_experts"
    if ".C." in name:
        return "vl_experts"
    if ".self_attn." in name or ".self_attn_layer_norm." in name:
        return "shared_attention"
    return "other"


def count_parameters(model: nn.Module, matrices_only: bool = False) -> dict[str, int]:
    """Parameter counts per group (see :func:`parameter_group`), plus ``backbone`` and ``total``.

    ``matrices_only=True`` counts only tensors of two or more dimensions (weight matrices, embedding tables,
    the patch convolution), leaving out biases, LayerNorms and the CLS/mask tokens. That is how the paper's
    Table 1 figures come out (giant: 692M per FFN expert set, 52M VL experts, 317M shared attention,
    1.9B with the pretraining heads). Works on models built on the ``meta`` device.
    """
    counts = dict.fromkeys(
        (
            "vision_experts",
            "language_experts",
            "vl_experts",
            "shared_attention",
            "word_embeddings",
            "embeddings",
            "heads",
            "other",
        ),
        0,
    )
    for name, p in model.named_parameters():
        if matrices_only and (p.dim() < 2 or name.endswith(("cls_token", "mask_token"))):
            continue
        counts[parameter_group(name)] += p.numel()
    counts["total"] = sum(counts.values())
    counts["backbone"] = counts["total"] - counts["heads"]
    return counts


def layer_id_for_lr_decay(name: str, depth: int) -> int:
    """Layer-wise learning-rate decay id, as in the released finetuning code.

    Embeddings (any name containing ``embed``) get 0, ``layers.i.`` gets i + 1, everything else (heads,
    final LayerNorm, poolers) depth + 1. The learning-rate scale is ``decay ** (depth + 1 - id)``.
    """
    if "embed" in name:
        return 0
    m = _LAYER.search(name)
    if m:
        return int(m.group(1)) + 1
    return depth + 1
