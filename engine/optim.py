"""Optimizer construction from the task's parameter groups, and the skip guard for non-finite steps."""

from __future__ import annotations

import logging

import torch

from beit3.engine.errors import EngineError

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "apex_fused_adam")


class OptimizerConfigError(EngineError, ValueError):
    """An optimizer name or parameter group the engine cannot build."""


def normalise_groups(groups: list[dict], weight_decay: float) -> list[dict]:
    """Copies of the task's groups with trainable params only, ``lr_scale`` and ``weight_decay`` filled in."""
    out, seen = [], set()
    for i, group in enumerate(groups):
        if "params" not in group:
            raise OptimizerConfigError(
                f"parameter group {i} has no 'params'; param_groups() must return dicts "
                "like {'params': [...], 'weight_decay': 0.05, 'lr_scale': 1.0}"
            )
        params = [p for p in group["params"] if p.requires_grad]
        if any(id(p) in seen for p in params):
            raise OptimizerConfigError(f"parameter group {i} repeats a parameter of an earlier group")
        seen.update(id(p) for p in params)
        if not params:
            continue
        filled = {**group, "params": params}
        filled.setdefault("lr_scale", 1.0)
        filled.setdefault("weight_decay", weight_decay)
        out.append(filled)
    if not out:
        raise OptimizerConfigError("param_groups() returned no trainable parameter")
    return out


def build_optimizer(
    groups: list[dict],
    name: str,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    device: torch.device,
) -> torch.optim.Optimizer:
    """AdamW over the normalised groups: torch's fused kernel on CUDA, apex FusedAdam if asked and present."""
    if name not in OPTIMIZERS:
        raise OptimizerConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    groups = normalise_groups(groups, weight_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    if name == "apex_fused_adam":
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
        except ImportError:
            log.warning("apex is not importable: falling back to torch AdamW")
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


class StepGuard:
    """Makes the base optimizer's ``step`` a no-op while ``skip`` is set.

    DeepSpeed's wrappers (ZeRO 1-3, bf16, fp16) call the base optimizer's ``step`` between unscaling and
    copying master weights back, so skipping it there leaves parameters and optimizer state unchanged at
    every stage and precision. DeepSpeed's own non-finite handling differs by stage and dtype, hence ours.
    The instance attribute shadows the class method; torch's step hooks stay on the class.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.skip = False
        self.skipped = 0
        self._step = optimizer.step
        optimizer.step = self._guarded_step

    def _guarded_step(self, *args, **kwargs):
        if self.skip:
            self.skipped += 1
            return None
        return self._step(*args, **kwargs)
