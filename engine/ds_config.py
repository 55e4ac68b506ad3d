"""Loading and validating DeepSpeed JSON configs (``ds_configs/*.json``).

The JSON is passed to DeepSpeed unchanged apart from dotted overrides and the resolved batch sizes.
Batch sizes live in these files only; the optimizer and LR schedule are built by the engine from the
training recipe, so an ``optimizer`` or ``scheduler`` block is an error rather than a silent conflict.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

from beit3.engine.config_io import set_dotted
from beit3.engine.errors import EngineError


class EngineConfigError(EngineError, ValueError):
    """A DeepSpeed config (or an override of it) that the engine cannot run; the message names the fix."""


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _read(path_or_dict: str | os.PathLike | dict) -> dict:
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict)
    try:
        with open(path_or_dict) as f:
            config = json.load(f)
    except FileNotFoundError as err:
        raise EngineConfigError(
            f"DeepSpeed config {path_or_dict} does not exist; pick one in ds_configs/"
        ) from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EngineConfigError(f"DeepSpeed config {path_or_dict} is not valid JSON: {err}") from err
    except OSError as err:
        raise EngineConfigError(
            f"DeepSpeed config {path_or_dict} cannot be read ({err.strerror}): give a JSON file"
        ) from err
    if not isinstance(config, dict):
        raise EngineConfigError(f"DeepSpeed config {path_or_dict} must hold a JSON object")
    return config


def resolve_batch_sizes(config: dict, world_size: int) -> dict:
    """Fill the missing one of global batch, micro-batch and accumulation steps; check that they agree.

    ``train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * world_size``.
    """
    config = copy.deepcopy(config)
    glob, micro, gas = (config.get(k) for k in BATCH_KEYS)
    for key, value in zip(BATCH_KEYS, (glob, micro, gas)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise EngineConfigError(f"{key} must be a positive integer, got {value!r}")
    if glob is None and micro is None:
        raise EngineConfigError(
            "set train_batch_size or train_micro_batch_size_per_gpu in the DeepSpeed config"
        )
    if micro is None:
        gas = gas or 1
        if glob % (gas * world_size):
            raise EngineConfigError(
                f"train_batch_size {glob} is not divisible by gradient_accumulation_steps "
                f"{gas} x world size {world_size}; change train_batch_size to a multiple "
                f"of {gas * world_size} or set train_micro_batch_size_per_gpu"
            )
        micro = glob // (gas * world_size)
    elif glob is None:
        gas = gas or 1
        glob = micro * gas * world_size
    elif gas is None:
        if glob % (micro * world_size):
            raise EngineConfigError(
                f"train_batch_size {glob} is not divisible by micro-batch {micro} x world "
                f"size {world_size}; use a global batch that is a multiple of "
                f"{micro * world_size}, or change the micro-batch or the number of ranks"
            )
        gas = glob // (micro * world_size)
    elif glob != micro * gas * world_size:
        raise EngineConfigError(
            f"train_batch_size {glob} != micro-batch {micro} x accumulation {gas} x world "
            f"size {world_size} = {micro * gas * world_size}; drop one of the three keys "
            "so that it is derived"
        )
    config.update(zip(BATCH_KEYS, (glob, micro, gas)))
    return config


def keep_global_batch(config: dict, global_batch: int, world_size: int, source: str = "checkpoint") -> dict:
    """A copy of a resolved config whose ``gradient_accumulation_steps`` keeps ``global_batch`` on
    ``world_size`` ranks with its micro-batch (a resume on another world size keeps the global batch).
    """
    micro = config["train_micro_batch_size_per_gpu"]
    if global_batch % (micro * world_size):
        fixes = []
        if global_batch % micro == 0:
            fixes.append(f"resume on a number of ranks that divides {global_batch // micro}")
        if global_batch % world_size == 0:
            fixes.append(f"set train_micro_batch_size_per_gpu to a divisor of {global_batch // world_size}")
        raise EngineConfigError(
            f"cannot keep the global batch (train_batch_size) {global_batch} of {source} on {world_size} "
            f"ranks: it is not a multiple of micro-batch {micro} x {world_size} ranks; "
            + (" or ".join(fixes) or "choose a micro-batch and a number of ranks whose product divides it")
        )
    config = copy.deepcopy(config)
    config.update(zip(BATCH_KEYS, (global_batch, micro, global_batch // (micro * world_size))))
    return config


def global_batch_problem(
    config: dict, expected: int, world_size: int, unit: int = 1, trained: int | None = None
) -> str | None:
    """None if the resolved ``config`` trains with global batch ``expected`` (0: any) on ``world_size``
    ranks, else one line with the ``--ds-set`` options that give it (a micro-batch that is a multiple of
    ``unit``, e.g. the images:texts:pairs split, no larger than the config's).

    ``trained``: the global batch of the checkpoint being resumed, which a resume on another world size
    keeps (engine/reshard.py) whatever the config now resolves to.
    """
    got = config["train_batch_size"]
    if trained is not None and trained != got:
        if not expected or trained == expected:
            return None
        return (
            f"the checkpoint being resumed was trained with global batch {trained} but the recipe's "
            f"schedule is written for {expected}: resume with the recipe it was trained with"
        )
    if not expected or got == expected:
        return None
    micro, gas = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    head = (
        f"the recipe's schedule is written for global batch {expected} but the DeepSpeed config gives "
        f"{micro} x {gas} accumulation x {world_size} ranks = {got}"
    )
    per_rank = expected // world_size if expected % world_size == 0 else 0
    fits = [m for m in range(unit, min(micro, per_rank) + 1, unit) if per_rank % m == 0]
    if not fits:
        return (
            f"{head}; no micro-batch (a multiple of {unit}) gives it on {world_size} ranks: change the ranks"
        )
    fix = fits[-1]
    return (
        f"{head}: --ds-set train_batch_size={expected} --ds-set train_micro_batch_size_per_gpu={fix} "
        f"--ds-set gradient_accumulation_steps={per_rank // fix}"
    )


def validate(config: dict) -> None:
    """Reject blocks the engine owns and contradictory precision settings."""
    for block in ("optimizer", "scheduler"):
        if block in config:
            raise EngineConfigError(
                f"remove the {block!r} block from the DeepSpeed config: the engine builds the "
                "optimizer and LR schedule from the training recipe (lr, warmup_steps, ...)"
            )
    fp16 = config.get("fp16", {}).get("enabled", False)
    bf16 = config.get("bf16", {}).get("enabled", False)
    if fp16 and bf16:
        raise EngineConfigError(
            "fp16 and bf16 are both enabled; set one of fp16.enabled / bf16.enabled to false"
        )
    clip = config.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 <= clip < float("inf"):
        raise EngineConfigError(f"gradient_clipping={clip!r} must be a number >= 0 (0: no clipping)")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise EngineConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    accum = config.get("data_types", {}).get("grad_accum_dtype")
    if stage == 0 and accum is not None and accum != precision_of(config):
        # DeepSpeed 0.19.8 raises NotImplementedError deep in initialize() for this mix.
        raise EngineConfigError(
            f"data_types.grad_accum_dtype={accum!r} differs from the training precision, "
            "which DeepSpeed supports only with ZeRO stage 1-3; remove it or use ZeRO >= 1"
        )


def load_ds_config(
    path_or_dict: str | os.PathLike | dict, world_size: int, overrides: dict[str, Any] | None = None
) -> dict:
    """Read a DeepSpeed JSON config, apply dotted overrides, resolve batch sizes, validate."""
    if world_size < 1:
        raise EngineConfigError(f"world_size must be >= 1, got {world_size}")
    config = set_dotted(_read(path_or_dict), overrides or {}, "JSON object in the config", EngineConfigError)
    validate(config)
    return resolve_batch_sizes(config, world_size)


def precision_of(config: dict) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``: the dtype DeepSpeed will train the module in."""
    if config.get("bf16", {}).get("enabled", False):
        return "bf16"
    if config.get("fp16", {}).get("enabled", False):
        return "fp16"
    return "fp32"
