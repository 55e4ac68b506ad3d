"""The shared part of every finetuning task module: the engine's task protocol over a pruned backbone.

A task module holds the backbone under ``beit3`` (so its state-dict keys are the released finetuned
checkpoints' keys) plus its heads, and implements what the engine asks of it (docs/architecture.md):
``forward(batch) -> (loss, metrics)``, ``prepare_batch``, ``param_groups`` and ``batch_stats``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from beit3.model import BEiT3Model, build_param_groups
from beit3.model.flops import Pass, linear_flops, training_flops


@dataclass
class OptimSettings:
    """Optimizer conventions the task applies in :meth:`FinetuneTask.param_groups`."""

    weight_decay: float = 0.05
    layer_decay: float = 1.0
    head_lr_scale: float = 1.0


POOLINGS = ("cls", "mean")  # task.pooling: what a pooled head reads of the encoder output


def pool_tokens(x: torch.Tensor, pooling: str, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, D) of an encoder output ``x`` (B, N, D): ``"cls"``, token 0 (the vision CLS, or ``<s>`` on
    text alone: the released heads); ``"mean"``, the mean over the tokens that are not padding
    (``padding_mask`` (B, N), True at padding; None: every token). On a fused sequence the mask covers the
    vision tokens too (:func:`fused_padding`)."""
    if pooling == "cls":
        return x[:, 0]
    if pooling != "mean":
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if padding_mask is None:
        return x.mean(dim=1)
    keep = (~padding_mask.bool()).unsqueeze(-1).to(x.dtype)  # (B, N, 1)
    return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)


def fused_padding(text_padding_mask: torch.Tensor | None, num_vision_tokens: int) -> torch.Tensor | None:
    """The (B, Nv + T) padding mask of a fused sequence (vision tokens first, never padding)."""
    if text_padding_mask is None:
        return None
    b = text_padding_mask.shape[0]
    vision = text_padding_mask.new_zeros((b, num_vision_tokens), dtype=torch.bool)
    return torch.cat([vision, text_padding_mask.bool()], dim=1)


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


class FinetuneTask(nn.Module):
    """Base class of the finetuning tasks: a pruned backbone (``self.beit3``) plus task heads, speaking the
    engine's protocol (:class:`beit3.engine.task.TaskModule`)."""

    configuration: str = ""
    head_prefixes: tuple[str, ...] = ("head",)

    def __init__(self, encoder: BEiT3Model, optim: OptimSettings | None = None) -> None:
        super().__init__()
        self.cfg = encoder.cfg
        self.beit3 = encoder.beit3
        self.optim = optim or OptimSettings()
        self._no_weight_decay = encoder.no_weight_decay() | {"logit_scale"}

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
        """Samples, tokens (padding left out) and training FLOPs of one micro-batch.

        FLOPs: :func:`beit3.model.flops.training_flops` of the backbone passes (:meth:`passes`) plus the
        task heads (:meth:`head_flops`).
        """
        vision, text, samples = self.token_counts(batch)
        flops = training_flops(self.cfg, self.passes(batch)) + self.head_flops(batch)
        return {"samples": samples, "tokens": vision + text, "flops": flops}

    def token_counts(self, batch: dict) -> tuple[int, int, int]:
        """(vision tokens, text tokens without padding, samples) of a micro-batch; override for pairs."""
        samples, vision, text = 0, 0, 0
        if "image" in batch:
            samples = batch["image"].shape[0]
            vision = samples * self.cfg.num_vision_tokens
        if "text" in batch:
            samples = batch["text"].shape[0]
            pad = batch.get("text_padding_mask")
            text = int((~pad.bool()).sum()) if pad is not None else batch["text"].numel()
        return vision, text, samples

    def passes(self, batch: dict) -> list[Pass]:
        """The backbone passes of a micro-batch: by default one over all it holds (image, text or both)."""
        key = "image" if "image" in batch else "text"
        text_len = batch["text"].shape[1] if "text" in batch else 0
        return [Pass(batch[key].shape[0], image="image" in batch, text_len=text_len)]

    def head_flops(self, batch: dict) -> float:
        """Training FLOPs of the task heads: each weight matrix applied once per example (pooled heads)."""
        rows = batch["image" if "image" in batch else "text"].shape[0]
        return sum(
            linear_flops(rows, *p.shape[::-1])
            for name, p in self.named_parameters()
            if p.ndim == 2 and name.startswith(self.head_prefixes)
        )
