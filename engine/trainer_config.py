"""Settings and outcome of a training run (``beit3.engine.trainer`` re-exports them)."""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from beit3.engine.config_io import (
    ConfigError,
    apply_overrides,
    bounded,
    declared_ranges,
    from_dict,
    range_problem,
    read_toml,
    refuse_moved,
)
from beit3.engine.ds_config import EngineConfigError
from beit3.engine.lr import SCHEDULES
from beit3.engine.optim import OPTIMIZERS
from beit3.engine.supervise import EXIT_NONFINITE, EXIT_PREEMPTED  # the exit-code contract

T = TypeVar("T")
EMA_PREFIX = "ema/"  # the scalars of an evaluation with the EMA weights (engine/ema.py)


@dataclass
class TrainSettings:
    """The ``[train]`` table of every recipe (pretraining, finetuning, VQ-KD): loop, optimizer, schedule,
    intervals and the hang watchdog. Batch sizes and ZeRO live in the DeepSpeed JSON; task-specific
    optimisation (finetuning's layer decay) has a table of its own in the task's recipe.

    Every numeric field carries its range (:func:`~beit3.engine.config_io.bounded`); :meth:`problem` is
    the one validation of these settings.
    """

    total_steps: int = bounded(1000, "[1, inf)")
    log_every: int = bounded(10, "[1, inf)")
    save_every: int = bounded(1000, "[0, inf)")  # 0: only at the end
    keep_last: int = bounded(3, "[1, inf)")
    seed: int = bounded(0, "[0, inf)")
    lr: float = bounded(1e-3, "(0, inf)")
    min_lr: float = bounded(0.0, "[0, inf)")
    warmup_steps: int = bounded(0, "[0, inf)")
    schedule: str = "cosine"
    weight_decay: float = bounded(0.05, "[0, inf)")
    betas: tuple[float, float] = bounded((0.9, 0.98), "[0, 1)")
    eps: float = bounded(1e-6, "(0, inf)")
    optimizer: str = "adamw"  # "adamw" | "apex_fused_adam"
    max_nonfinite_in_row: int = bounded(5, "[1, inf)")
    eval_every: int = bounded(0, "[0, inf)")  # 0: no periodic evaluation
    # Keep the best evaluated checkpoint (engine/best.py) by this eval scalar, higher ("max") or lower
    # ("min") better, beside the last keep_last. "none": keep none; "": the program's default (finetuning:
    # the task's metric; pretraining: none).
    best_metric: str = ""
    best_mode: str = "max"  # "max" | "min"
    # Exponential moving average of the weights (engine/ema.py; timm's ModelEma, the released finetuning
    # recipes' model_ema_decay, e.g. 0.9999): after every optimizer step that ran, ema = decay x ema +
    # (1 - decay) x weights; each evaluation also runs on it (scalars prefixed "ema/"). 0: off.
    ema_decay: float = bounded(0.0, "[0, 1)")
    # The global batch the step counts are written for (epochs, the paper's schedule), checked against the
    # DeepSpeed config and world size at start-up (0: any). The size itself is set in the DeepSpeed JSON only.
    global_batch_size: int = bounded(0, "[0, inf)")
    tensorboard: bool = True
    peak_flops: float | None = bounded(None, "(0, inf)")  # None: from the device (engine/metrics.py)
    # Hang watchdog (engine/watchdog.py): seconds without step progress before stacks are dumped and the
    # process exits EXIT_HUNG. None: max(watchdog_floor_s, watchdog_factor x median step time); 0: off.
    # BEIT3_WATCHDOG_S in the environment overrides watchdog_s.
    watchdog_s: float | None = bounded(None, "[0, inf)")
    watchdog_floor_s: float = bounded(600.0, "(0, inf)")
    watchdog_factor: float = bounded(10.0, "[1, inf)")

    def problem(self, where: str = "train", warmup_within_total: bool = True) -> str | None:
        """The first problem of these settings, as one line naming ``where.field`` and the fix; None if none.

        ``warmup_within_total``: refuse ``warmup_steps > total_steps`` (recipes do; the engine runs it, the
        LR then never leaves its warmup ramp).
        """
        if len(self.betas) != 2:
            return f"{where}.betas={list(self.betas)!r} needs two values, e.g. [0.9, 0.98]"
        problem = range_problem(self, where, declared_ranges(TrainSettings))
        if problem is not None:
            return problem
        checks = [
            (self.schedule in SCHEDULES,
             f"schedule={self.schedule!r} is unknown: use one of {', '.join(SCHEDULES)}"),
            (self.optimizer in OPTIMIZERS,
             f"optimizer={self.optimizer!r} is unknown: use one of {', '.join(OPTIMIZERS)}"),
            (self.min_lr <= self.lr,
             f"min_lr={self.min_lr!r} exceeds lr={self.lr!r}: "
             "lower min_lr (the schedule decays from lr to min_lr)"),
            (not warmup_within_total or self.warmup_steps <= self.total_steps,
             f"warmup_steps={self.warmup_steps} exceeds total_steps={self.total_steps}: lower warmup_steps"),
            (self.best_mode in ("max", "min"),
             f"best_mode={self.best_mode!r} is unknown: use 'max' (higher is better) or 'min'"),
            (self.best_metric in ("", "none") or self.eval_every > 0,
             f"best_metric={self.best_metric!r} needs periodic evaluations: set eval_every > 0, "
             "or best_metric = 'none'"),
            (not self.best_metric.startswith(EMA_PREFIX) or self.ema_decay > 0,
             f"best_metric={self.best_metric!r} names an evaluation of the EMA weights, which needs "
             f"ema_decay > 0: set ema_decay (e.g. 0.9999), or a metric without the {EMA_PREFIX!r} prefix"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                return f"{where}.{message}"
        return _watchdog_problem(self.watchdog_s)

    def validate(self, where: str = "train") -> None:
        """Raise EngineConfigError with :meth:`problem`'s message."""
        problem = self.problem(where)
        if problem is not None:
            raise EngineConfigError(problem)


@dataclass
class TrainerConfig(TrainSettings):
    """A recipe's :class:`TrainSettings` plus where this run lives and how it is embedded: the run
    directory and resume choice (command line), what ``config.json`` records, and the process handling."""

    output_dir: str = ""
    resume: str = "auto"  # "auto" | "none" | a checkpoint path
    run_info: dict = field(default_factory=dict)
    handle_signals: bool = True
    shutdown_at_end: bool = True  # barrier + destroy_process_group when fit() returns

    @classmethod
    def for_run(cls, settings: TrainSettings, output_dir: str, **run: Any) -> TrainerConfig:
        """``settings`` (a recipe's [train] table) for the run in ``output_dir``; ``run`` sets the other
        run fields (``resume``, ``run_info``, ``shutdown_at_end``, ...)."""
        own = {f.name: getattr(settings, f.name) for f in dataclasses.fields(TrainSettings)}
        return cls(**own, output_dir=output_dir, **run)

    def settings(self) -> TrainSettings:
        """The recipe part of this config: its ``[train]`` table, without the run's own fields."""
        return TrainSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainSettings)})

    def validate(self, where: str = "TrainerConfig") -> None:
        """Raise EngineConfigError naming the field to fix (every numeric field has a range)."""
        problem = self.problem(where, warmup_within_total=False)
        if problem is None and not self.output_dir:
            problem = f"{where}.output_dir is empty: give the run directory (--output-dir)"
        if problem is not None:
            raise EngineConfigError(problem)


# Fields of TrainerConfig a run sets, not a recipe: a recipe's [train] naming one is told where it belongs.
RUN_FIELDS = {
    "output_dir": "--output-dir",
    "resume": "--resume",
    "run_info": "the program",
    "handle_signals": "the program",
    "shutdown_at_end": "the program",
}


def read_recipe(
    cls: type[T], path: str | Path, overrides: list[str] | None = None, moved: dict | None = None
) -> T:
    """The one reader of recipe files: TOML, then ``section.key=value`` overrides, then dataclass ``cls``
    (unknown keys refused). ``moved``: keys of earlier recipe layouts and where they live now
    (:func:`~beit3.engine.config_io.refuse_moved`); a run's own fields in ``[train]`` are refused naming the
    option that sets them."""
    data = apply_overrides(read_toml(path), overrides or [])
    refuse_moved(data, moved or {})
    train = data.get("train", {})
    for key, where in RUN_FIELDS.items():
        if isinstance(train, dict) and key in train:
            raise ConfigError(f"[train] {key} is set by {where}, not by the recipe: remove it")
    return from_dict(cls, data)


def _watchdog_problem(watchdog_s: float | None) -> str | None:
    from beit3.engine.watchdog import limit_from_env

    try:
        limit_from_env(watchdog_s)
    except ValueError as err:
        return str(err)
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
