"""Released-format checkpoint files: read, adapt (position interpolation), write.

A released BEiT-3 file is ``{"model": state_dict}`` (DeepSpeed-saved ones use ``"module"``) with keys
``beit3.*``, ``mlm_head.*`` and ``mim_head.*``. We read both, plus raw state dicts and safetensors files,
and write ``{"model": state_dict}``.

A ``.pth`` is a pickle, and unpickling one in full can call any function the file names. Files are read with
torch's weights-only unpickler, which builds tensors, containers and plain values and, beyond those, exactly
:data:`SAFE_GLOBALS`; anything else raises :class:`UntrustedCheckpointError` naming the file and the types.
Loading a file one trusts beyond that is explicit: ``trusted=True`` or :func:`trusted_files`.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from beit3.model.beit3 import resize_position_grid
from beit3.model.config import ModelConfig
from beit3.model.errors import ModelError
from beit3.model.qkv import unfuse_qkv

log = logging.getLogger(__name__)

VISION_POSITIONS = "beit3.encoder.embed_positions.A.weight"
# Where a file we write carries its model configuration: the "config" entry beside "model" (a .pth), or this
# metadata key (a .safetensors). Released files carry none.
CONFIG_KEY = "config"
# Rows of the vision table before the patch grid: two unused (fairseq offset) rows and the CLS row.
_EXTRA_ROWS = 3
# The one non-tensor type released files hold: the finetuning scripts save their argparse.Namespace as "args".
SAFE_GLOBALS = (argparse.Namespace,)
_TRUSTED = contextvars.ContextVar("beit3_model_trusted_files", default=False)


class WeightsFileError(ModelError, RuntimeError):
    """A weights file (a released-format checkpoint, a state dict) that cannot be read or does not fit."""


class UntrustedCheckpointError(WeightsFileError):
    """A checkpoint holding types outside :data:`SAFE_GLOBALS`: unpickling it could run code."""


@contextlib.contextmanager
def trusted_files(enabled: bool = True) -> Iterator[None]:
    """Within this context checkpoint files are unpickled in full: only for files of trusted origin."""
    token = _TRUSTED.set(bool(enabled))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


@dataclass
class LoadReport:
    """What a non-strict load did."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = []
        for title, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("interpolated", self.interpolated),
        ):
            if keys:
                lines.append(
                    f"{title} ({len(keys)}): " + ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
                )
        return "; ".join(lines) or "all keys matched"


def read_state_dict(path: str | os.PathLike, trusted: bool = False) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint file (``.pth``/``.pt`` or ``.safetensors``), on CPU (a zip-format
    ``.pth`` memory-mapped).

    ``trusted=True`` (or :func:`trusted_files`) unpickles beyond :data:`SAFE_GLOBALS`; otherwise such a file
    raises :class:`UntrustedCheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"checkpoint file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return checkpoint_key_names(load_file(str(path)))
        # Memory-mapped: every rank of a job reads the file (the giant's fp32 weights are 7.6 GB), and
        # only the pages of the tensors copied into the model are read.
        return unwrap_state_dict(_torch_load_mmap(path, trusted or _TRUSTED.get()), str(path))
    except WeightsFileError:
        raise
    except Exception as e:  # truncated, or not a checkpoint at all
        raise WeightsFileError(f"cannot read checkpoint {path}: {e}") from e


def _torch_load(path: Path, trusted: bool) -> object:
    if trusted:
        log.info("loading %s in full (trusted file)", path)
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = _refused_types(path, err)
        if not names:  # junk, or a pickle torch.save did not write: nothing ran, nothing to trust
            raise WeightsFileError(f"cannot read checkpoint {path}: not a file torch.save wrote") from None
        raise UntrustedCheckpointError(
            f"refusing to load {path}: it holds {names}, which a weights file does not "
            "need, and unpickling it could run code; if you trust where it came from, load it with "
            "trusted=True (--trust-checkpoint on the command line)"
        ) from None


def _refused_types(path: Path, err: Exception) -> str:
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS}
    try:  # torch's scan of the pickle names every type; its message only the first
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed
    except Exception:  # noqa: BLE001 - not a zip checkpoint
        names = set(re.findall(r"GLOBAL ([\w.]+)", str(err)))
    return ", ".join(sorted(names))


def unwrap_state_dict(obj: object, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Take the weights from ``{"model": sd}``, ``{"module": sd}`` or a bare state dict, under the
    checkpoint key names (:func:`checkpoint_key_names`)."""
    if isinstance(obj, dict):
        for key in ("model", "module"):
            if key in obj and isinstance(obj[key], dict):
                return checkpoint_key_names(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return checkpoint_key_names(obj)
    raise WeightsFileError(f"{where} holds no state dict under 'model' or 'module'")


def checkpoint_key_names(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` under the key names checkpoint files use (``model.state_dict()``'s): the paper layout's
    fused q/k/v parameter, ``...self_attn.qkv_proj.{weight,bias}`` (its name in ``named_parameters()``, so
    in DeepSpeed's ZeRO shards and a consolidation of them), becomes ``...self_attn.{q,k,v}_proj.*`` (views
    of its row blocks); a dict without such keys comes back as it is."""
    return unfuse_qkv(state_dict)


def interpolate_vision_positions(table: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Resize the vision position table (3 leading rows + a square grid) to ``num_rows`` rows.

    The leading rows (two unused, one CLS) are kept; the grid is resized bicubically
    (align_corners=False), as the released loader does when finetuning at 384 or 480 px.
    """
    old_grid = table.shape[0] - _EXTRA_ROWS
    new_grid = num_rows - _EXTRA_ROWS
    old_side, new_side = math.isqrt(old_grid), math.isqrt(new_grid)
    if old_side**2 != old_grid or new_side**2 != new_grid:
        raise WeightsFileError(f"vision position table of {table.shape[0]} rows is not 3 + a square grid")
    extra, grid = table[:_EXTRA_ROWS], table[_EXTRA_ROWS:]
    return torch.cat([extra, resize_position_grid(grid, new_side, new_side)], dim=0)


def adapt_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict, list[str]]:
    """Interpolate vision position tables whose size differs from the model's; returns the names changed."""
    target = model.state_dict()
    changed = []
    out = dict(state_dict)
    for name, value in state_dict.items():
        if name.endswith("embed_positions.A.weight") and name in target:
            rows = target[name].shape[0]
            if value.shape[0] != rows:
                out[name] = interpolate_vision_positions(value, rows)
                changed.append(name)
    return out, changed


def load_checkpoint(
    model: nn.Module,
    source: str | os.PathLike | dict,
    strict: bool = True,
    ignore: tuple[str, ...] = (),
    trusted: bool = False,
) -> LoadReport:
    """Load a released-format checkpoint (path or dict) into ``model``.

    Vision positions are interpolated to the model's resolution. Keys starting with any prefix in
    ``ignore`` are dropped first. ``strict=True`` raises :class:`WeightsFileError` naming the missing and
    unexpected keys and any shape mismatch. ``trusted`` as in :func:`read_state_dict`.
    """
    sd = read_state_dict(source, trusted) if not isinstance(source, dict) else unwrap_state_dict(source)
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)} if ignore else sd
    sd, interpolated = adapt_state_dict(sd, model)
    target = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in sd.items()
        if k in target and v.shape != target[k].shape
    ]
    if mismatched:
        raise WeightsFileError("shape mismatch: " + "; ".join(mismatched))
    result = model.load_state_dict(sd, strict=False)
    report = LoadReport(sorted(result.missing_keys), sorted(result.unexpected_keys), interpolated)
    if strict and (report.missing or report.unexpected):
        raise WeightsFileError(f"checkpoint does not match the model: {report}")
    return report


@dataclass
class PretrainedReport:
    """What :func:`load_pretrained_weights` did, key by key: the report finetuning (``model.pretrained``) and
    a warm-started pretraining run (``[model] warm_start``) print."""

    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # the architecture's keys the model prunes
    fresh: list[str] = field(default_factory=list)  # the model's keys the checkpoint lacks (heads)
    interpolated: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" ... (+{len(keys) - 6})" if len(keys) > 6 else "")

        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.unused:
            lines.append(f"not used by this configuration ({len(self.unused)}): {show(self.unused)}")
        if self.fresh:
            lines.append(f"initialised fresh ({len(self.fresh)}): {show(self.fresh)}")
        if self.interpolated:
            lines.append(f"positions interpolated: {show(self.interpolated)}")
        return "; ".join(lines)


def load_pretrained_weights(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    architecture_keys: set[str] | None = None,
    backbone_prefix: str = "beit3.",
) -> PretrainedReport:
    """Load a pretrained state dict into ``model`` (whose backbone sits under ``backbone_prefix``), explaining
    every key that does not match.

    ``architecture_keys``: the keys of the whole architecture the checkpoint holds (default: ``model``'s own);
    checkpoint keys among them that ``model`` lacks are expected drops (*unused*). Model keys outside the
    backbone that the checkpoint lacks (task or pretraining heads) stay as initialised (*fresh*). Vision
    positions are interpolated to the model's resolution. A checkpoint key of no part of the architecture, a
    backbone parameter the checkpoint lacks, or a shape that differs raise :class:`WeightsFileError` naming
    the keys: the checkpoint belongs to another architecture.
    """
    own = model.state_dict()
    known = set(own) if architecture_keys is None else architecture_keys
    unused = sorted(k for k in state_dict if k not in own and k in known)
    foreign = sorted(k for k in state_dict if k not in own and k not in known)
    if foreign:
        raise WeightsFileError(
            f"checkpoint keys {foreign[:6]}{' ...' if len(foreign) > 6 else ''} belong to no part of this "
            "architecture: it was saved from another one (released vs paper layout) or holds the heads of "
            "another task"
        )
    missing_backbone = sorted(k for k in own if k.startswith(backbone_prefix) and k not in state_dict)
    if missing_backbone:
        raise WeightsFileError(
            f"checkpoint lacks backbone parameters {missing_backbone[:6]}"
            f"{' ...' if len(missing_backbone) > 6 else ''}: it was saved from another architecture "
            "(or with normalize_output=False)"
        )
    kept = {k: v for k, v in state_dict.items() if k in own}
    report = load_checkpoint(model, kept, strict=False)
    return PretrainedReport(
        loaded=sorted(kept), unused=unused, fresh=sorted(report.missing), interpolated=report.interpolated
    )


def architecture_problem(recorded: dict, cfg: ModelConfig, where: str, built_from: str) -> str | None:
    """Why a checkpoint whose recorded model configuration is ``recorded`` (:func:`read_config`) cannot be
    loaded into a model of configuration ``cfg``, or None when their architecture fields agree.

    ``where`` names the file, ``built_from`` where ``cfg`` came from (e.g. ``model.name=...``). The message
    names both sides of every differing field (``beit3.model.config.ARCHITECTURE_FIELDS``) and the preset
    the file matches, if any; resolution, regularisation and kept heads may differ.
    """
    from beit3.model.config import ModelConfigError, architecture_differences
    from beit3.model.registry import get_config, list_models

    try:
        theirs = ModelConfig.from_dict(recorded)
    except ModelConfigError as e:
        return f"{where} records a model configuration this version cannot read: {e}"
    differences = architecture_differences(theirs, cfg)
    if not differences:
        return None
    fields = ", ".join(f"{k} {mine!r} (the file: {file!r})" for k, (file, mine) in differences.items())
    presets = [n for n in list_models() if not architecture_differences(theirs, get_config(n))]
    fix = (
        f"set model.name={presets[0]}, the preset the file matches"
        if presets
        else "set model.name and model.overrides to the file's configuration"
    )
    return f"{where} was trained as another architecture than {built_from}, which has {fields}: {fix}"


def save_checkpoint(
    model_or_state: nn.Module | dict[str, torch.Tensor],
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    config: ModelConfig | dict | None = None,
) -> Path:
    """Write ``{"model": state_dict}`` (or a safetensors file for a ``.safetensors`` path) atomically.

    ``dtype`` casts floating-point tensors (e.g. ``torch.bfloat16`` halves the file). ``config`` (a
    ModelConfig or its dict) is stored beside the weights, ``{"model": sd, "config": {...}}`` (safetensors:
    JSON metadata), so the file describes its architecture (:func:`read_config`); readers of the released
    format take ``"model"`` and ignore it.
    """
    if isinstance(config, ModelConfig):
        config = config.to_dict()
    sd = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    sd = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in checkpoint_key_names(sd).items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = None if config is None else {CONFIG_KEY: json.dumps(config)}
        # safetensors refuses tensors that share memory: q/k/v are row blocks of one fused tensor
        save_file(_unshared(sd), str(tmp), metadata=metadata)
    else:
        torch.save({"model": sd} if config is None else {"model": sd, CONFIG_KEY: dict(config)}, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated file under the final name
    return path


def _unshared(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors that share storage with an earlier one (views of one fused parameter) copied."""
    seen: set[int] = set()
    out = {}
    for key, value in sd.items():
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        out[key] = value.clone() if ptr in seen else value
        if ptr is not None:
            seen.add(ptr)
    return out


def read_config(source: str | os.PathLike | dict, trusted: bool = False) -> dict | None:
    """The model configuration a checkpoint carries (as :meth:`ModelConfig.to_dict` wrote it), or None for a
    file without one: released checkpoints, DeepSpeed files, raw state dicts.

    A ``.pth`` is memory-mapped, so the weights are not read; ``trusted`` as in :func:`read_state_dict`.
    """
    if isinstance(source, dict):
        obj = source
    else:
        path = Path(source)
        if not path.is_file():
            raise WeightsFileError(f"checkpoint file {path} does not exist")
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    text = (f.metadata() or {}).get(CONFIG_KEY)
                obj = {CONFIG_KEY: json.loads(text)} if text else {}
            else:
                obj = _torch_load_mmap(path, trusted or _TRUSTED.get())
        except WeightsFileError:
            raise
        except Exception as e:  # truncated, or not a checkpoint at all
            raise WeightsFileError(f"cannot read checkpoint {path}: {e}") from e
    config = obj.get(CONFIG_KEY) if isinstance(obj, dict) else None
    return dict(config) if isinstance(config, dict) else None


def _torch_load_mmap(path: Path, trusted: bool) -> object:
    """Like ``_torch_load`` without reading the tensors (files of the legacy, non-zip format are read)."""
    if trusted:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError):  # legacy format, or refused types: _torch_load says which
        return _torch_load(path, trusted)
