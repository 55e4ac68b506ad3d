"""Load a pretrained (released-format) checkpoint into a task model, explaining every key that does not match.

A checkpoint holds the whole backbone and both pretraining heads; a task model holds one configuration's
part of it plus fresh task heads. Keys fall into four groups and the report lists each:

* loaded: present on both sides;
* unused: parameters of the full model that this configuration prunes (``.B.`` copies in a vision encoder,
  ``mim_head``): expected, reported as "not used by this configuration";
* fresh: task-head parameters the checkpoint lacks (``head.*``, ``pooler.*``, ...): initialised anew;
* errors: a backbone parameter the checkpoint lacks, or a checkpoint key the architecture does not have at
  all. Both mean the checkpoint belongs to another architecture and raise :class:`ReloadError`.

A file this version wrote (``beit3-export``, a finetuning run's ``model.pth``) also carries its model
configuration: :func:`check_architecture` refuses it up front, naming the fields, when the model it is loaded
into differs in an architecture field (``beit3.model.config.ARCHITECTURE_FIELDS``). Released files carry
none and are checked key by key.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

from beit3.engine import safe_load
from beit3.finetune.errors import FinetuneError
from beit3.model import WeightsFileError, load_checkpoint, read_state_dict
from beit3.model import checkpoint as model_checkpoint
from beit3.model.checkpoint import (
    PretrainedReport,
    architecture_problem,
    load_pretrained_weights,
    read_config,
    unwrap_state_dict,
)
from beit3.model.config import ModelConfig

BACKBONE_PREFIX = "beit3."


class ReloadError(FinetuneError, WeightsFileError):
    """A checkpoint that does not belong to the task model's architecture."""


@contextlib.contextmanager
def trusted_checkpoints(enabled: bool = True) -> Iterator[None]:
    """``--trust-checkpoint``: within this context both loaders unpickle in full (released files in
    beit3.model, training checkpoints in beit3.engine); without it, types beyond their allowlists are
    refused."""
    with model_checkpoint.trusted_files(enabled), safe_load.trusted_files(enabled):
        yield


# What load_pretrained did, key by key: the model package's report, shared with warm-started pretraining.
ReloadReport = PretrainedReport


def check_architecture(
    cfg: ModelConfig, source: str | os.PathLike | dict, built_from: str, trusted: bool = False
) -> None:
    """Refuse ``source`` when the model configuration it carries differs from ``cfg`` (the model it is to be
    loaded into; ``built_from`` says where that came from, e.g. ``model.name=...``) in an architecture field.

    The message names both sides of every differing field and the preset the file matches, if any. A file
    without a configuration (the released ones) passes: its keys and shapes are checked on load.
    """
    recorded = read_config(source, trusted)
    if recorded is None:
        return
    where = "the checkpoint" if isinstance(source, dict) else str(source)
    problem = architecture_problem(recorded, cfg, where, built_from)
    if problem:
        raise ReloadError(problem)


def load_pretrained(
    task: nn.Module,
    source: str | os.PathLike | dict,
    architecture_keys: set[str],
    ignore: tuple[str, ...] = (),
) -> ReloadReport:
    """Load ``source`` into ``task`` (a module whose backbone sits under ``beit3.``).

    ``architecture_keys`` are the keys of the unpruned model with both pretraining heads
    (:func:`beit3.finetune.configurations.full_model_keys`): checkpoint keys among them that ``task`` lacks
    are expected drops. Keys starting with a prefix in ``ignore`` are dropped first (e.g. ``("head.",)`` to
    reuse a backbone finetuned on another task).
    """
    sd = read_state_dict(source) if not isinstance(source, dict) else unwrap_state_dict(source)
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)} if ignore else dict(sd)
    try:
        return load_pretrained_weights(
            task, fit_logit_scale(sd, task.state_dict()), architecture_keys, BACKBONE_PREFIX
        )
    except WeightsFileError as e:
        raise ReloadError(
            f"{e}; build the task with the checkpoint's model name and sizes (model.name, vocab), or pass "
            "ignore=(prefix,) for task heads of another finetuned model"
        ) from e


def fit_logit_scale(sd: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reshape a released 0-d ``logit_scale`` to the task's (1,) (or back): the one known shape convention."""
    for key, value in sd.items():
        if key.endswith("logit_scale") and key in own and value.numel() == 1:
            sd[key] = value.reshape(own[key].shape)
    return sd


def load_finetuned(task: nn.Module, source: str | os.PathLike | dict, trusted: bool = False) -> None:
    """Strictly load a finetuned task model (``model.pth`` of a run, or a released finetuned checkpoint).

    Released finetuned files hold an ``argparse.Namespace`` beside the weights, which loads as is; other
    non-tensor types need ``trusted=True`` (see :func:`beit3.model.checkpoint.read_state_dict`). A file that
    carries its model configuration (our ``model.pth``) is checked against the task's first
    (:func:`check_architecture`).
    """
    sd = read_state_dict(source, trusted) if not isinstance(source, dict) else unwrap_state_dict(source)
    cfg = getattr(task, "cfg", None)  # a task module's backbone configuration
    if isinstance(cfg, ModelConfig):
        check_architecture(cfg, source, "the task model this recipe builds", trusted)
    try:
        load_checkpoint(task, fit_logit_scale(dict(sd), task.state_dict()), strict=True)
    except WeightsFileError as e:
        raise ReloadError(f"{e}; build the task with the recipe the checkpoint was trained with") from e


def checkpoint_overrides(source: str | os.PathLike | dict) -> dict[str, int]:
    """Model-config overrides implied by a checkpoint's shapes (text vocabulary, text positions).

    Our own small pretrained checkpoints use a task-sized vocabulary rather than the released 64010 rows.
    """
    sd = read_state_dict(source) if not isinstance(source, dict) else unwrap_state_dict(source)
    out = {}
    emb: torch.Tensor | None = sd.get("beit3.text_embed.weight")
    if emb is not None:
        out["vocab_size"] = emb.shape[0]
    pos = sd.get("beit3.encoder.embed_positions.B.weight")
    if pos is not None:
        out["max_text_positions"] = pos.shape[0]
    mim = sd.get("mim_head.weight")
    if mim is not None:
        out["visual_vocab_size"] = mim.shape[0]
    return out
