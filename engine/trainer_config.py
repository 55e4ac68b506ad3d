"""Settings and outcome of a training run (``beit3.engine.trainer`` re-exports them)."""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from beit3.engine.ds_config import EngineConfigError
from beit3.engine.lr import SCHEDULES
from beit3.engine.optim import OPTIMIZERS

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the Slurm scripts requeue the job on this code
EXIT_NONFINITE = 3
EXIT_HUNG = 76  # the watchdog found no step progress: stacks dumped; requeued within a failure budget


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
    # Hang watchdog (engine/watchdog.py): seconds without step progress before stacks are dumped and the
    # process exits EXIT_HUNG. None: max(watchdog_floor_s, watchdog_factor x median step time); 0: off.
    # BEIT3_WATCHDOG_S in the environment overrides watchdog_s.
    watchdog_s: float | None = None
    watchdog_floor_s: float = 600.0
    watchdog_factor: float = 10.0

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
        """Raise EngineConfigError naming the field to fix (every numeric field has a range)."""
        problem = train_settings_problem(self, "TrainerConfig", warmup_within_total=False)
        if problem is None and self.peak_flops is not None and not self.peak_flops > 0:
            problem = f"TrainerConfig.peak_flops={self.peak_flops!r} must be > 0 or None (from the device)"
        if problem is None:
            problem = _watchdog_problem(self)
        if problem is not None:
            raise EngineConfigError(problem)


def _watchdog_problem(cfg: TrainerConfig) -> str | None:
    from beit3.engine.watchdog import limit_from_env

    if cfg.watchdog_s is not None and not cfg.watchdog_s >= 0:
        return f"TrainerConfig.watchdog_s={cfg.watchdog_s!r} must be >= 0 (0: off) or None (derived)"
    try:
        limit_from_env(cfg.watchdog_s)
    except ValueError as err:
        return str(err)
    return None


# The range of every numeric training setting; recipes' [train] sections are checked against the same table.
TRAIN_RANGES = {
    "total_steps": "[1, inf)",
    "log_every": "[1, inf)",
    "save_every": "[0, inf)",  # 0: only at the end
    "keep_last": "[1, inf)",
    "seed": "[0, inf)",
    "lr": "(0, inf)",
    "min_lr": "[0, inf)",
    "warmup_steps": "[0, inf)",
    "weight_decay": "[0, inf)",
    "betas": "[0, 1)",
    "eps": "(0, inf)",
    "max_nonfinite_in_row": "[1, inf)",
    "eval_every": "[0, inf)",  # 0: no periodic evaluation
    "watchdog_floor_s": "(0, inf)",
    "watchdog_factor": "[1, inf)",
}


def train_settings_problem(section: Any, where: str, warmup_within_total: bool = True) -> str | None:
    """The first problem of the training settings ``section`` holds (a TrainerConfig or a recipe's [train]
    dataclass; fields it lacks are skipped), as one line naming ``where.field`` and the fix; None if none.

    ``warmup_within_total``: refuse ``warmup_steps > total_steps`` (recipes do; the engine runs it, the LR
    then never leaves its warmup ramp).
    """
    from beit3.engine.config_io import range_problem

    def has(name: str) -> bool:
        return hasattr(section, name)

    if has("betas") and len(section.betas) != 2:
        return f"{where}.betas={list(section.betas)!r} needs two values, e.g. [0.9, 0.98]"
    problem = range_problem(section, where, {k: v for k, v in TRAIN_RANGES.items() if has(k)})
    if problem is not None:
        return problem
    checks = [
        (not has("schedule") or section.schedule in SCHEDULES,
         f"schedule={getattr(section, 'schedule', '')!r} is unknown: use one of {', '.join(SCHEDULES)}"),
        (not has("optimizer") or section.optimizer in OPTIMIZERS,
         f"optimizer={getattr(section, 'optimizer', '')!r} is unknown: use one of {', '.join(OPTIMIZERS)}"),
        (not (has("min_lr") and has("lr")) or section.min_lr <= section.lr,
         f"min_lr={getattr(section, 'min_lr', 0)!r} exceeds lr={getattr(section, 'lr', 0)!r}: "
         "lower min_lr (the schedule decays from lr to min_lr)"),
        (not (warmup_within_total and has("warmup_steps") and has("total_steps"))
         or section.warmup_steps <= section.total_steps,
         f"warmup_steps={getattr(section, 'warmup_steps', 0)} exceeds "
         f"total_steps={getattr(section, 'total_steps', 0)}: lower warmup_steps"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            return f"{where}.{message}"
    return None


def preflight(cfg: TrainerConfig, ds_config: dict, world_size: int) -> None:
    """Everything about a run that can be wrong before a model exists: the settings, the DeepSpeed config as
    DeepSpeed's own parser reads it, the precision this machine can train in, the run directory and the
    resume choice. Raises EngineConfigError, or the checkpoint module's CheckpointError for a resume that
    cannot be honoured; programs map both to exit 2."""
    cfg.validate()
    check_with_deepspeed_parser(ds_config, world_size)
    check_precision_supported(ds_config)
    check_output_dir(cfg.output_dir)
    from beit3.engine.checkpoint import resolve_resume

    resolve_resume(cfg.resume, cfg.output_dir)


class _DataParallelSize:
    """The one process-group question DeepSpeedConfig asks; lets it check batch sizes without a group."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def get_data_parallel_world_size(self) -> int:
        return self.world_size


def check_with_deepspeed_parser(ds_config: dict, world_size: int) -> None:
    """Run DeepSpeed's config parser (no process group, no engine): a misspelt key inside a block such as
    ``zero_optimization`` is refused here in one line instead of inside ``deepspeed.initialize``."""
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(copy.deepcopy(ds_config), mpu=_DataParallelSize(world_size))
    except (ValueError, AssertionError, TypeError, KeyError) as e:
        detail = " ".join(str(e).split())
        if hasattr(e, "errors"):  # pydantic: the field path and what is wrong with it
            fields = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()[:3]
            )
            detail = f"{getattr(e, 'title', '')} {fields}".strip()
        raise EngineConfigError(
            f"DeepSpeed refuses the config: {detail}; fix that key in the --ds-config JSON "
            "(or its --ds-set override)"
        ) from e


def check_precision_supported(ds_config: dict) -> None:
    """fp16/bf16 in the DeepSpeed config on an accelerator that cannot train in it (DeepSpeed refuses fp16
    on most CPUs deep inside ``initialize``) is a configuration error."""
    from deepspeed.accelerator import get_accelerator

    from beit3.engine.ds_config import precision_of

    precision = precision_of(ds_config)
    accelerator = get_accelerator()
    supported = {
        "fp16": accelerator.is_fp16_supported,
        "bf16": accelerator.is_bf16_supported,
    }.get(precision, lambda: True)()
    if not supported:
        other = "bf16 or fp32" if precision == "fp16" else "fp16 or fp32"
        raise EngineConfigError(
            f"{precision}.enabled=true in the DeepSpeed config, but this machine's "
            f"{accelerator.device_name()} device cannot train in {precision}: use a {other} config "
            f"(ds_configs/*_{'bf16' if precision == 'fp16' else 'fp32'}.json) or a device that supports it"
        )


def check_output_dir(output_dir: str) -> None:
    """The run directory must be a directory, or creatable: a file in its place (or above it), or a parent
    that cannot be written, is reported before any model is built."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise EngineConfigError(
            f"--output-dir {output_dir} is a file, not a directory: give a directory path"
        )
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise EngineConfigError(
            f"--output-dir {output_dir}: {existing} is a file, so the directory cannot be created: "
            "give another path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EngineConfigError(
            f"--output-dir {output_dir}: {existing} is not writable: give a directory you can write to"
        )


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
