"""Crash-safe training checkpoints: DeepSpeed states + per-rank trainer files + a ``latest`` pointer.

Layout under ``<output_dir>/checkpoints``::

    latest                       # the tag of the last complete checkpoint, replaced atomically, written last
    step00001000/                # one tag per saved step
        mp_rank_00_model_states.pt, zero_pp_rank_*_...   # DeepSpeed's files (save_latest=False)
        trainer_rank00000.pt ... # per rank: trainer step, data state, RNG states (python, numpy, torch, cuda)
        complete.json            # rank 0, after a barrier: step, world size, resolved DeepSpeed config

A save interrupted anywhere before the pointer is replaced leaves the previous checkpoint current; tag dirs
without ``complete.json`` or newer than the pointer are removed when the next run starts.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

log = logging.getLogger(__name__)

POINTER = "latest"
MARKER = "complete.json"
TAG_PATTERN = re.compile(r"^step(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read; the message says what to pass instead."""


def tag_for_step(step: int) -> str:
    """The tag of the checkpoint taken after ``step`` optimizer steps."""
    return f"step{step:08d}"


def step_of_tag(tag: str) -> int | None:
    """Inverse of ``tag_for_step`` (None for other names)."""
    match = TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then ``os.replace``: readers see old or new."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    """``<output_dir>/checkpoints``."""
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The tag dir named by ``<output_dir>/checkpoints/latest`` if it is complete, else None."""
    root = checkpoint_root(output_dir)
    try:
        tag = (root / POINTER).read_text().strip()
    except FileNotFoundError:
        return None
    tag_dir = root / tag
    return tag_dir if (tag_dir / MARKER).is_file() else None


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """The tag dir to resume from: ``"auto"`` (the run's pointer, if any), ``"none"``, or a path.

    A path may name a tag dir, a checkpoints dir holding ``latest``, or a run dir.
    """
    if resume == "none":
        if latest_checkpoint(output_dir) is not None:
            raise CheckpointError(
                f"{output_dir} already holds checkpoints and resume='none' would mix two runs in it; "
                "continue with resume='auto' or use a new output_dir"
            )
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if (path / MARKER).is_file():
        return path
    for root in (path, path / "checkpoints"):
        if (root / POINTER).is_file():
            found = latest_checkpoint(root.parent)
            if found is not None:
                return found
    raise CheckpointError(
        f"resume={resume!r} is not a complete checkpoint (a tag dir with {MARKER}, or a run "
        "dir with checkpoints/latest); pass 'auto', 'none' or such a path"
    )


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, and the current CUDA device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.barrier()


class CheckpointManager:
    """Saves and loads checkpoints of a DeepSpeed engine plus per-rank trainer state; keeps the last K."""

    def __init__(self, output_dir: str | os.PathLike, rank: int, world_size: int, keep_last: int = 3):
        self.root = checkpoint_root(output_dir)
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last

    def completed_tags(self) -> list[str]:
        """Complete tag names, oldest first."""
        if not self.root.is_dir():
            return []
        tags = [
            p.name for p in self.root.iterdir() if step_of_tag(p.name) is not None and (p / MARKER).is_file()
        ]
        return sorted(tags, key=step_of_tag)

    def clean_incomplete(self) -> list[str]:
        """Remove (rank 0) tag dirs a crash left (no marker, or newer than the pointer); all ranks wait."""
        removed = []
        if self.rank == 0 and self.root.is_dir():
            current = latest_checkpoint(self.root.parent)
            current_step = step_of_tag(current.name) if current is not None else -1
            for path in self.root.iterdir():
                step = step_of_tag(path.name)
                if step is not None and (not (path / MARKER).is_file() or step > current_step):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path.name)
            for tmp in self.root.glob(f".{POINTER}.tmp*"):
                tmp.unlink(missing_ok=True)
        if removed:
            log.warning("removed incomplete checkpoint dirs %s", removed)
        _barrier()
        return removed

    def save(self, engine, step: int, rank_state: dict, run_state: dict) -> Path:
        """Collective: DeepSpeed states, this rank's trainer file, then (rank 0) marker and pointer."""
        tag = tag_for_step(step)
        tag_dir = self.root / tag
        if self.rank == 0 and tag_dir.exists():
            shutil.rmtree(tag_dir)  # a stale attempt at this step; the pointer never names it
        _barrier()
        engine.save_checkpoint(
            str(self.root), tag=tag, client_state={"trainer_step": step}, save_latest=False
        )
        tag_dir.mkdir(parents=True, exist_ok=True)
        path = tag_dir / f"trainer_rank{self.rank:05d}.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save({**rank_state, "step": step, "world_size": self.world_size}, tmp)
        os.replace(tmp, path)
        _barrier()  # every rank's files are on disk before the checkpoint is declared complete
        if self.rank == 0:
            marker = {**run_state, "step": step, "world_size": self.world_size}
            atomic_write_bytes(tag_dir / MARKER, json.dumps(marker, indent=1, default=str).encode())
            self.commit(tag)
            self.prune()
        _barrier()
        return tag_dir

    def commit(self, tag: str) -> None:
        """Point ``latest`` at ``tag`` (rank 0). The only write that makes a checkpoint current."""
        atomic_write_bytes(self.root / POINTER, tag.encode())

    def prune(self) -> None:
        """Delete the oldest complete checkpoints beyond ``keep_last`` (never the pointer's target)."""
        current = latest_checkpoint(self.root.parent)
        tags = [t for t in self.completed_tags() if current is None or t != current.name]
        excess = len(tags) + (current is not None) - self.keep_last
        for tag in tags[: max(excess, 0)]:
            shutil.rmtree(self.root / tag, ignore_errors=True)

    def load(self, engine, tag_dir: Path) -> tuple[dict | None, dict]:
        """Load DeepSpeed states into ``engine``; return this rank's trainer state (None if the world size
        changed, so per-rank data and RNG cannot be mapped) and the run state from the marker."""
        run_state = json.loads((tag_dir / MARKER).read_text())
        load_path, _ = engine.load_checkpoint(
            str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise CheckpointError(
                f"DeepSpeed could not load {tag_dir}; resume from another tag or with 'none'"
            )
        path = tag_dir / f"trainer_rank{self.rank:05d}.pt"
        if run_state["world_size"] != self.world_size or not path.is_file():
            log.warning(
                "checkpoint %s was written by %d ranks, this run has %d: data and RNG states restart",
                tag_dir,
                run_state["world_size"],
                self.world_size,
            )
            return None, run_state
        return torch.load(path, map_location="cpu", weights_only=False), run_state
