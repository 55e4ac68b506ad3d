"""Optimizer parameter groups for finetuning: layer-wise lr decay, a head lr multiplier, decay exemptions.

Reproduces the released finetuning conventions (beit3/optim_factory.py behaviour, re-implemented): the lr of
a parameter is ``lr * layer_decay ** (depth + 1 - layer_id)`` with :func:`beit3.model.layer_id_for_lr_decay`
(embeddings 0, layer i -> i + 1, heads depth + 1), times ``head_lr_scale`` for task-head parameters (VQA uses
20); biases, 1-D (norm) parameters, scalars and the model's ``no_weight_decay()`` names get no weight decay.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from beit3.model import layer_id_for_lr_decay


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
