"""Settings and outcome of a training run (``beit3.engine.trainer`` re-exports them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from beit3.engine.ds_config import EngineConfigError
from beit3.engine.lr import SCHEDULES
from beit3.engine.optim import OPTIMIZERS

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the Slurm scripts requeue the job on this code
EXIT_NONFINITE = 3


@dataclass
class TrainerConfig:
    """Loop, optimizer and schedule settings (batch sizes and ZeRO live in the DeepSpeed JSON)."""

    output_dir: str
    total_steps: int
    log_every: int = 10
    save_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # "auto" | "none" | a checkpoint path
    seed: int = 0
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    optimizer: str = "adamw"  # "adamw" | "apex_fused_adam"
    max_nonfinite_in_row: int = 5
    tensorboard: bool = True
    peak_flops: float | None = None
    run_info: dict = field(default_factory=dict)
    eval_every: int = 0
    handle_signals: bool = True
    shutdown_at_end: bool = True  # barrier + destroy_process_group when fit() returns

    @classmethod
    def from_section(cls, section: Any, **fields: Any) -> TrainerConfig:
        """Build from a recipe's ``[train]`` dataclass: every field the two share by name is copied, the
        section's own extras (e.g. finetuning's ``layer_decay``) are left to its program, and ``fields``
        (``output_dir``, ``resume``, ``run_info``, ...) are set directly."""
        own = {f.name for f in dataclasses.fields(cls)}
        shared = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name in own}
        if "betas" in shared:
            shared["betas"] = tuple(shared["betas"])
        return cls(**{**shared, **fields})

    def validate(self) -> None:
        """Raise EngineConfigError naming the field to fix."""
        checks = [
            (self.total_steps >= 1, "total_steps must be >= 1"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.save_every >= 0, "save_every must be >= 0 (0: only at the end)"),
            (self.keep_last >= 1, "keep_last must be >= 1"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.max_nonfinite_in_row >= 1, "max_nonfinite_in_row must be >= 1"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.eval_every >= 0, "eval_every must be >= 0 (0: no periodic evaluation)"),
        ]
        for ok, message in checks:
            if not ok:
                raise EngineConfigError(f"TrainerConfig: {message}")


@dataclass
class TrainResult:
    """How ``fit`` ended: ``exit_reason`` is "finished", "preempted" or "nonfinite"."""

    step: int
    exit_reason: str
    last_metrics: dict[str, float]

    @property
    def exit_code(self) -> int:
        """The process exit code a CLI should return: 0, EXIT_PREEMPTED (75) or EXIT_NONFINITE (3)."""
        return {"finished": 0, "preempted": EXIT_PREEMPTED, "nonfinite": EXIT_NONFINITE}[self.exit_reason]
