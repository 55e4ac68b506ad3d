"""Parameter accounting and optimizer conventions that depend only on parameter names.

Parameter groups (weight decay, its exemptions, layer-wise lr decay) live here, for every task: they follow
the released finetuning conventions (beit3/optim_factory.py behaviour, re-implemented). The lr of a
parameter is ``lr * layer_decay ** (depth + 1 - layer_id)`` with :func:`layer_id_for_lr_decay` (embeddings
0, layer i -> i + 1, heads depth + 1), times ``head_lr_scale`` for task-head parameters (VQA uses 20);
biases, 1-D (norm) parameters, scalars and the model's ``no_weight_decay()`` names get no weight decay.
Pretraining uses the same groups with no layer decay.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

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


def lr_scale(
    name: str, depth: int, layer_decay: float, head_lr_scale: float, head_prefixes: tuple[str, ...]
) -> float:
    """The learning-rate multiplier of one parameter."""
    scale = layer_decay ** (depth + 1 - layer_id_for_lr_decay(name, depth))
    if head_prefixes and name.startswith(head_prefixes):
        scale *= head_lr_scale
    return scale


def exempt_from_weight_decay(name: str, param: nn.Parameter, no_weight_decay: Iterable[str]) -> bool:
    """Biases, norms, scalars (``logit_scale``) and explicitly named parameters are not decayed."""
    return param.ndim <= 1 or name.endswith(".bias") or name in set(no_weight_decay)


def build_param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    depth: int,
    weight_decay: float,
    layer_decay: float = 1.0,
    head_lr_scale: float = 1.0,
    head_prefixes: tuple[str, ...] = ("head",),
    no_weight_decay: Iterable[str] = (),
) -> list[dict]:
    """Parameter groups (``params``, ``weight_decay``, ``lr_scale``), one per distinct (scale, decay) pair.

    Frozen parameters (``requires_grad=False``) are left out. Group order is deterministic (first
    appearance), so every rank builds the same optimizer.
    """
    no_wd = set(no_weight_decay)
    groups: dict[tuple[float, float], dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        wd = 0.0 if exempt_from_weight_decay(name, p, no_wd) else weight_decay
        scale = lr_scale(name, depth, layer_decay, head_lr_scale, head_prefixes)
        group = groups.setdefault((scale, wd), {"params": [], "weight_decay": wd, "lr_scale": scale})
        group["params"].append(p)
    return list(groups.values())
