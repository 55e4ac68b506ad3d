"""Resume a ZeRO checkpoint on another number of ranks, through DeepSpeed's universal checkpoint format.

ZeRO-1/2/3 shard the fp32 master weights and the optimizer moments over the ranks that wrote them, and
DeepSpeed refuses to load those shards on another data-parallel world size. Its universal format holds
every parameter whole (``zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt``) and loads on any number of ranks
when the engine is built with ``checkpoint.load_universal``. When a resume finds a checkpoint written by
another world size, before ``deepspeed.initialize``:

1. ``plan_resume`` reads the checkpoint's ``complete.json`` and keeps its global batch on the new world
   size (``gradient_accumulation_steps`` re-derived, ``EngineConfigError`` when impossible);
2. ``ensure_universal`` converts it once (rank 0; the other ranks wait for the outcome) into
   ``<tag dir>/universal/``: written to a temp dir, marked complete, then renamed, so that a half-written
   conversion is never used and the original shards stay untouched;
3. the engine is built with ``checkpoint.load_universal`` and ``CheckpointManager.load`` reads
   ``<tag dir>/universal``.
Stage 0 keeps whole states in ``mp_rank_00_model_states.pt`` and loads on any world size as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as torch_dist

from beit3.engine.checkpoint import (
    MARKER,
    UNIVERSAL_MARKER,
    UNIVERSAL_TAG,
    CheckpointError,
    atomic_write_bytes,
    is_converted,
    universal_dir,
)
from beit3.engine.ds_config import EngineConfigError, keep_global_batch
from beit3.engine.safe_load import vet_files

log = logging.getLogger(__name__)


@dataclass
class ResumePlan:
    """What a resume from ``tag_dir`` needs before the engine is built."""

    tag_dir: Path
    saved_world_size: int
    world_size: int
    ds_config: dict  # the config to train with (and to record): the checkpoint's global batch kept
    universal: bool  # ZeRO shards that must go through the universal format

    @property
    def init_config(self) -> dict:
        """The config for ``deepspeed.initialize``: ``checkpoint.load_universal`` set when converting."""
        if not self.universal:
            return self.ds_config
        config = copy.deepcopy(self.ds_config)
        config.setdefault("checkpoint", {})["load_universal"] = True
        return config


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def plan_resume(tag_dir: Path | None, ds_config: dict, world_size: int) -> ResumePlan | None:
    """The plan for resuming from ``tag_dir`` (None for a fresh run); pure apart from reading the marker.

    On another world size the checkpoint's global batch is kept: ``gradient_accumulation_steps`` is
    re-derived for the current micro-batch (an ``EngineConfigError`` names the fix when no integer works).
    """
    if tag_dir is None:
        return None
    run_state = json.loads((tag_dir / MARKER).read_text())
    saved_world = int(run_state["world_size"])
    saved_config = run_state.get("ds_config") or {}
    if saved_world == world_size:
        return ResumePlan(tag_dir, saved_world, world_size, ds_config, universal=False)
    config = ds_config
    saved_global = saved_config.get("train_batch_size")
    if saved_global is not None and saved_global != ds_config["train_batch_size"]:
        config = keep_global_batch(ds_config, int(saved_global), world_size, source=str(tag_dir))
        log.warning(
            "checkpoint %s was written by %d ranks with global batch %d; on %d ranks keeping it with "
            "gradient_accumulation_steps %d (was %d)",
            tag_dir,
            saved_world,
            saved_global,
            world_size,
            config["gradient_accumulation_steps"],
            ds_config["gradient_accumulation_steps"],
        )
    saved_stage = zero_stage(saved_config) if saved_config else zero_stage(ds_config)
    if saved_stage != zero_stage(ds_config):
        raise EngineConfigError(
            f"checkpoint {tag_dir} was written with zero_optimization.stage {saved_stage}, the DeepSpeed "
            f"config has {zero_stage(ds_config)}; a resume on another world size ({saved_world} -> "
            f"{world_size}) keeps the stage: set zero_optimization.stage={saved_stage}"
        )
    return ResumePlan(tag_dir, saved_world, world_size, config, universal=saved_stage > 0)


def convert_to_universal(tag_dir: Path) -> Path:
    """Convert the ZeRO checkpoint in ``tag_dir`` to ``<tag dir>/universal`` (one process; idempotent).

    DeepSpeed's converter writes into a temp dir beside the target; the marker is written into it last and
    the dir is then renamed, so ``universal/`` exists only complete. The source files are only read.
    """
    target = universal_dir(tag_dir)
    if is_converted(tag_dir):
        return target
    for stale in tag_dir.glob(f".{UNIVERSAL_TAG}.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # no marker: not one of ours, or damaged; never used as it is
        shutil.rmtree(target)
    tmp = tag_dir / f".{UNIVERSAL_TAG}.tmp{os.getpid()}"
    start = time.perf_counter()
    vet_files(sorted(tag_dir.glob("*.pt")))  # DeepSpeed's converter unpickles them in full
    _run_deepspeed_converter(tag_dir, tmp)
    # The converter points a `latest_universal` file beside its output at it: not part of our layout.
    (tag_dir / "latest_universal").unlink(missing_ok=True)
    marker = {"source": tag_dir.name, "seconds": round(time.perf_counter() - start, 3)}
    atomic_write_bytes(tmp / UNIVERSAL_MARKER, json.dumps(marker).encode())
    os.replace(tmp, target)
    _fsync_dir(tag_dir)
    log.info("converted %s to DeepSpeed's universal format in %.1f s", tag_dir, marker["seconds"])
    return target


def _run_deepspeed_converter(tag_dir: Path, out: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(out),
        num_extract_workers=1,  # no process pool inside a training process (CUDA, open process groups)
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # our ZeRO-1/2 checkpoints carry no Megatron-style universal info
    )
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            ds_to_universal.main(args)
    except Exception as err:
        shutil.rmtree(out, ignore_errors=True)
        tail = printed.getvalue()[-2000:]
        raise CheckpointError(
            f"converting {tag_dir} to DeepSpeed's universal format failed ({type(err).__name__}: {err}); "
            f"resume it on its original world size instead. Converter output: {tail}"
        ) from err


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_universal(tag_dir: Path, rank: int) -> Path:
    """Collective: rank 0 converts (unless already done), every rank gets the outcome; raises on failure.

    The other ranks wait in a broadcast, so the conversion must end within the process group's timeout.
    """
    error = None
    if rank == 0:
        try:
            convert_to_universal(tag_dir)
        except Exception as err:  # every rank raises the same error below
            error = str(err) if isinstance(err, CheckpointError) else f"{type(err).__name__}: {err}"
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        box = [error]
        torch_dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CheckpointError(error)
    if not is_converted(tag_dir):
        raise CheckpointError(
            f"{universal_dir(tag_dir)} is not visible on rank {rank}: the run dir must be on a file system "
            "every rank sees"
        )
    return universal_dir(tag_dir)
