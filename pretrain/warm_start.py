"""Warm start (continued pretraining): a run's initial weights from a released-format or exported checkpoint.

``[model] warm_start = "path"`` names a checkpoint of the recipe's architecture: a released pretrained file
(``beit3_base_patch16_224.pth``) or a ``beit3-export`` file. Its model weights replace the fresh
initialisation; the optimizer and the learning-rate schedule start fresh (step 0, the warmup's first LR), as
the released "in-domain" models were continued from the base ones with masked data modeling on COCO and
Visual Genome. The file is read and checked while the run is set up (it exists, torch wrote it, the model
configuration it records is the recipe's architecture), before any model is built; its weights are loaded
into the model on every rank right after the model is built, before DeepSpeed partitions it under ZeRO-3.
Vision position tables of another resolution are interpolated; another shape (vocabulary, text positions,
codebook) or a backbone key of another architecture is a configuration error naming the keys; heads of
another task in the file are not used. What was loaded
(:class:`beit3.model.checkpoint.PretrainedReport`) is logged once by rank 0 and written to
``<output-dir>/warm_start.json``.

A warm start is not a resume: when the run directory already holds a checkpoint (or ``--resume`` names one),
the run resumes from it (weights, optimizer, schedule, data position) and the warm start is not applied
again, nor its file read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from beit3.engine.checkpoint import resolve_resume
from beit3.engine.config_io import ConfigError
from beit3.model import ModelConfig, WeightsFileError, read_state_dict
from beit3.model.checkpoint import architecture_problem, load_pretrained_weights, read_config

log = logging.getLogger("beit3.pretrain")

REPORT_FILE = "warm_start.json"
BACKBONE_PREFIX = "beit3."  # the BEiT3Model's backbone; beside it only the heads
FIX = "give a released-format checkpoint or a beit3-export file of the recipe's model"


def read_warm_start(
    path: str, model_cfg: ModelConfig, model_name: str, trusted: bool = False
) -> dict[str, torch.Tensor]:
    """The weights of the checkpoint ``path`` (``[model] warm_start``), checked against the recipe's model
    configuration ``model_cfg`` where the file records one; every problem is a ConfigError naming the key."""
    where = f"[model] warm_start={path!r}"
    if not Path(path).is_file():
        raise ConfigError(f"{where} does not exist: {FIX}")
    try:
        recorded = read_config(path, trusted)
        state = read_state_dict(path, trusted)
    except WeightsFileError as e:
        raise ConfigError(f"{where}: {e}") from e
    problem = recorded and architecture_problem(recorded, model_cfg, where, f"model.name={model_name}")
    if problem:
        raise ConfigError(problem)
    return state


def warm_start_weights(
    recipe, resume: str, output_dir: str, model_cfg: ModelConfig, trusted: bool = False, is_main: bool = True
) -> dict[str, torch.Tensor] | None:
    """The checkpoint weights a run starts from (:func:`read_warm_start`), or None: no ``warm_start`` in the
    recipe, or a run that resumes (``resume``/``output_dir`` as the engine resolves them), whose checkpoint
    holds its weights."""
    path = recipe.model.warm_start
    if not path:
        return None
    resumed = resolve_resume(resume, output_dir)
    if resumed is not None:
        if is_main:
            log.info("warm start from %s not applied: the run resumes from %s", path, resumed)
        return None
    return read_warm_start(path, model_cfg, recipe.model.name, trusted)


def apply_warm_start(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str):
    """Load ``state`` into the freshly built ``model``; returns the report (PretrainedReport).

    The backbone (``beit3.*``) must be complete, of no other architecture, and of the model's shapes (vision
    positions are interpolated). The pretraining heads (``mlm_head``, ``mim_head``) may be missing from the
    file (initialised fresh); heads of another task in it (an image-text-contrastive checkpoint's
    ``vision_head``, ``language_head``, ``logit_scale``) are reported as unused.
    """
    other_heads = {k for k in state if not k.startswith(BACKBONE_PREFIX)}
    try:
        return load_pretrained_weights(model, state, set(model.state_dict()) | other_heads, BACKBONE_PREFIX)
    except WeightsFileError as e:
        raise ConfigError(
            f"[model] warm_start={path!r}: {e}; the recipe's model must have the checkpoint's architecture "
            "and sizes (model.name, [model.overrides] vocab_size / visual_vocab_size / max_text_positions)"
        ) from e


def write_report(output_dir: str | Path, path: str, report) -> Path:
    """``warm_start.json`` in the run directory: the source file and what was loaded, key by key."""
    target = Path(output_dir) / REPORT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"source": str(path), **asdict(report)}, indent=1) + "\n")
    return target
