"""The shared part of every finetuning task module: the engine's task protocol over a pruned backbone.

A task module holds the backbone under ``beit3`` (so its state-dict keys are the released finetuned
checkpoints' keys) plus its heads, and implements what the engine asks of it (docs/architecture.md):
``forward(batch) -> (loss, metrics)``, ``prepare_batch``, ``param_groups`` and ``batch_stats``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from beit3.finetune.optim import build_param_groups
from beit3.model import BEiT3Model


@dataclass
class OptimSettings:
    """Optimizer conventions the task applies in :meth:`TaskModule.param_groups`."""

    weight_decay: float = 0.05
    layer_decay: float = 1.0
    head_lr_scale: float = 1.0


def init_head(module: nn.Module, scale: float = 1.0) -> None:
    """Truncated-normal(0.02) Linear weights, zero biases, unit LayerNorms; Linear weights then x ``scale``.

    The released heads for classification and NLVR2 use ``scale=0.001`` so that finetuning starts from
    near-uniform predictions.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            with torch.no_grad():
                m.weight.mul_(scale)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class TaskModule(nn.Module):
    """Base class: a pruned backbone (``self.beit3``) plus task heads, speaking the engine's protocol."""

    configuration: str = ""
    head_prefixes: tuple[str, ...] = ("head",)

    def __init__(self, encoder: BEiT3Model, optim: OptimSettings | None = None) -> None:
        super().__init__()
        self.cfg = encoder.cfg
        self.beit3 = encoder.beit3
        self.optim = optim or OptimSettings()
        self._no_weight_decay = encoder.no_weight_decay() | {"logit_scale"}
        self._flops_params: dict[str, int] | None = None  # computed once heads exist (first batch_stats)

    # --- engine protocol -------------------------------------------------------------------------------
    def prepare_batch(self, batch: dict, device: torch.device | str) -> dict:
        """Move tensors to ``device``; floating tensors take the parameters' dtype (bf16 under DeepSpeed)."""
        dtype = next(self.parameters()).dtype
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
                if v.is_floating_point() and k in self.float_inputs:
                    v = v.to(dtype)
            out[k] = v
        return out

    float_inputs: tuple[str, ...] = ("image", "image2")

    def param_groups(self) -> list[dict]:
        """Groups with layer-wise lr decay, the head lr multiplier and weight-decay exemptions."""
        o = self.optim
        return build_param_groups(
            self.named_parameters(),
            depth=self.cfg.depth,
            weight_decay=o.weight_decay,
            layer_decay=o.layer_decay,
            head_lr_scale=o.head_lr_scale,
            head_prefixes=self.head_prefixes,
            no_weight_decay=self._no_weight_decay,
        )

    def batch_stats(self, batch: dict) -> dict:
        """Samples, tokens and approximate training FLOPs of one micro-batch.

        FLOPs = 6 x (per-token parameters) x tokens + 12 x depth x width x (sequence length)^2 per sample.
        """
        vision, text, seq, samples = self.token_counts(batch)
        d, depth = self.cfg.embed_dim, self.cfg.depth
        if self._flops_params is None:
            self._flops_params = _per_token_parameters(self)
        flops = 6.0 * (vision * self._flops_params["vision"] + text * self._flops_params["text"])
        flops += 12.0 * depth * d * seq**2 * samples
        return {"samples": samples, "tokens": vision + text, "flops": flops}

    def token_counts(self, batch: dict) -> tuple[int, int, int, int]:
        """(vision tokens, text tokens, sequence length, samples) of a micro-batch; override for pairs."""
        samples, vision, text, seq = 0, 0, 0, 0
        if "image" in batch:
            samples = batch["image"].shape[0]
            vision = samples * self.cfg.num_vision_tokens
            seq += self.cfg.num_vision_tokens
        if "text" in batch:
            samples = batch["text"].shape[0]
            pad = batch.get("text_padding_mask")
            text = int((~pad.bool()).sum()) if pad is not None else batch["text"].numel()
            seq += batch["text"].shape[1]
        return vision, text, seq, samples


def _per_token_parameters(module: nn.Module) -> dict[str, int]:
    """Parameters a vision / a text token passes through: shared weights plus its expert copy.

    Lookup tables (text embedding, position tables) cost no multiply-adds and are left out; heads are
    counted for every token, an over-estimate for heads applied to few tokens.
    """
    out = {"vision": 0, "text": 0}
    for name, p in module.named_parameters():
        if "text_embed" in name or "embed_positions" in name:
            continue
        parts = set(name.split("."))
        if "B" not in parts:
            out["vision"] += p.numel()
        if "A" not in parts:
            out["text"] += p.numel()
    return out
