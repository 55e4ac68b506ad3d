"""Learning-rate schedules as a pure function of the step (no optimizer, no state to checkpoint)."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_at(
    step: int, peak: float, warmup: int, total: int, min_lr: float = 0.0, schedule: str = "cosine"
) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Linear warmup from ``peak / warmup`` (step 0) to ``peak`` (step ``warmup - 1``), then a decay to
    ``min_lr`` at step ``total``: half-cosine (BEiT-3's pretraining schedule), linear, or constant at peak.
    Steps past ``total`` stay at ``min_lr`` (``peak`` for constant).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    decay_steps = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / decay_steps, 1.0)
    if schedule == "linear":
        return peak + (min_lr - peak) * progress
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * progress))
