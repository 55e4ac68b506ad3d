"""Reading training-checkpoint files without running code from them.

A ``.pt`` file is a pickle, and unpickling one in full (``torch.load(weights_only=False)``, what DeepSpeed's
checkpoint engines and ``zero_to_fp32`` do) calls whatever functions the file names: a checkpoint copied from
elsewhere can run any code. Every file the engine reads goes through :func:`load_file` instead: torch's
weights-only unpickler, which builds tensors, containers and plain values and, beyond those, exactly the
classes in :data:`DEEPSPEED_GLOBALS`. The trainer's own per-rank files need none of them (``capture_rng``
stores plain values). Anything else is refused with :class:`UntrustedFileError`, naming the file and the
types; loading such a file in full is an explicit choice, :func:`trusted_files` (``--trust-checkpoint``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from beit3.engine.errors import CheckpointError

log = logging.getLogger(__name__)

# Found by saving real checkpoints (ZeRO 0-3, fp32, bf16 with fp32 accumulation, 1 and 2 ranks, and their
# universal conversions) and listing ``torch.serialization.get_unsafe_globals_in_checkpoint``: the loss scaler
# (DynamicLossScaler with fp16) and the stage enum of ZeRO optimizer shards, the fragment addresses of the
# BF16_Optimizer's and ZeRO-1/2's ``param_slice_mappings``. Model-state files need none.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
_TRUSTED = contextvars.ContextVar("beit3_engine_trusted_files", default=False)


class UntrustedFileError(CheckpointError):
    """A checkpoint file holding types outside the allowlist: unpickling it could run code."""


@contextlib.contextmanager
def trusted_files(enabled: bool = True) -> Iterator[None]:
    """Within this context the engine unpickles checkpoint files in full: only for files of trusted origin."""
    token = _TRUSTED.set(bool(enabled))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def _allowed() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_file(path: str | os.PathLike, map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """``torch.load`` of an engine or DeepSpeed checkpoint file, refusing types outside the allowlist."""
    if _TRUSTED.get():
        log.info("loading %s in full (trusted file)", path)
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=False)
    try:
        with torch.serialization.safe_globals(_allowed()):
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as err:
        names = _refused(path, err)
        if not names:  # junk, or a pickle torch.save did not write: nothing ran, nothing to trust
            raise CheckpointError(f"cannot read {path}: not a file torch.save wrote") from None
        raise UntrustedFileError(
            f"refusing to load {path}: it holds {names}, which no file the engine or DeepSpeed "
            "writes needs, and unpickling it could run code; if you trust where it came from, pass "
            "--trust-checkpoint"
        ) from None


def _refused(path: str | os.PathLike, err: Exception) -> str:
    """The types the weights-only unpickler refused: torch's scan of the pickle, else its message."""
    try:
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - set(DEEPSPEED_GLOBALS)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: fall back to the message
        names = set(re.findall(r"GLOBAL ([\w.]+)", str(err)))
    return ", ".join(sorted(names))


def vet_files(paths: Iterable[str | os.PathLike]) -> None:
    """Check files that a loader outside our control will unpickle in full (``zero_to_fp32``, DeepSpeed's
    universal checkpoints, ``ds_to_universal``): each must pass :func:`load_file` (storages memory-mapped)."""
    if _TRUSTED.get():
        return
    for path in paths:
        load_file(path, mmap=zipfile.is_zipfile(path))


def guard_engine(engine) -> None:
    """Make ``engine.load_checkpoint`` read every file through :func:`load_file`.

    DeepSpeed's checkpoint engines unpickle in full; the engine's instance gets our loader instead (the
    engine's save path is untouched). The universal-checkpoint loader calls ``torch.load`` itself, so a
    universal tag dir is vetted file by file before it runs.
    """
    if engine.checkpoint_engine is not None:
        engine.checkpoint_engine.load = load_file
    original = engine.load_checkpoint

    def load_checkpoint(load_dir, tag=None, *args, **kwargs):
        if engine.load_universal_checkpoint() and tag is not None:
            vet_files(sorted(Path(load_dir, str(tag)).rglob("*.pt")))
        return original(load_dir, tag, *args, **kwargs)

    engine.load_checkpoint = load_checkpoint
