"""Crash-safe training checkpoints: DeepSpeed states + per-rank trainer files + a ``latest`` pointer.

Layout under ``<output_dir>/checkpoints``::

    latest                       # the tag of the last committed checkpoint, replaced atomically, written last
    step00001000/                # one tag per saved step
        mp_rank_00_model_states.pt, zero_pp_rank_*_...   # DeepSpeed's files (save_latest=False)
        trainer_rank00000.pt ... # per rank: trainer step, data state, RNG states (python, numpy, torch, cuda)
        ema_rank00000.pt ...     # with train.ema_decay > 0: the EMA of the weights (engine/ema.py); rank 0
                                 # alone under ZeRO 0-2, every rank its partitions under ZeRO-3
        complete.json            # rank 0, after a barrier: step, world size, resolved DeepSpeed config, and
                                 # the size and CRC-32 of every file of the tag (each rank checksums a share)
    corrupt-step00000900-<time>/ # a checkpoint that failed verification, set aside (never deleted)
    best.json                    # the best evaluated checkpoint (engine/best.py): tag, step, metric, value;
                                 # its tag is kept beside the last ``keep_last`` (never pruned)

A save interrupted anywhere before its marker is written leaves a tag dir without ``complete.json``: the next
start removes it. A complete checkpoint (marker present) is never removed at start-up: without a readable
``latest`` (missing, empty, naming a dir that is gone) the run resumes from the newest complete checkpoint,
and the pointer is repaired. Before a checkpoint is used every rank verifies its share of the recorded files;
a checkpoint that fails is set aside with a warning naming the file, and the previous complete one is tried:
all ranks agree on the tag (docs/reliability.md).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

from beit3.engine.errors import CheckpointError
from beit3.engine.safe_load import load_file

log = logging.getLogger(__name__)

POINTER = "latest"
MARKER = "complete.json"
BEST = "best.json"
TAG_PATTERN = re.compile(r"^step(\d{8,})$")
UNIVERSAL_TAG = "universal"  # <tag dir>/universal, loaded by DeepSpeed as tag "universal" of <tag dir>
UNIVERSAL_MARKER = "universal_complete.json"  # written last by engine/reshard.py's conversion


class CheckpointSpaceError(CheckpointError):
    """A save that ran out of disk space: the message names the path, the space needed and the space free."""


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


def _read_pointer(root: Path) -> str | None:
    """The tag named by ``root/latest`` (None if missing, unreadable or empty)."""
    try:
        tag = (root / POINTER).read_text().strip()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, UnicodeDecodeError):
        return None
    return tag or None


def read_best(root: Path) -> dict | None:
    """The record of ``root/best.json`` (a checkpoints dir), or None when missing or unreadable."""
    try:
        record = json.loads((root / BEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("tag"), str) else None


def write_best(root: Path, record: dict | None) -> None:
    """Replace ``root/best.json`` atomically with ``record`` (None removes it)."""
    if record is None:
        (root / BEST).unlink(missing_ok=True)
    else:
        atomic_write_bytes(root / BEST, json.dumps(record, indent=1).encode())


def complete_tags(root: Path) -> list[str]:
    """Complete tag names under a checkpoints dir (marker present), oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if step_of_tag(p.name) is not None and (p / MARKER).is_file()]
    return sorted(tags, key=step_of_tag)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a run in ``output_dir`` continues from, before verification (None if it has none).

    The newest complete tag: normally the one ``latest`` names; a newer complete one exists only when a run
    died between the marker and the pointer; without a usable pointer it is the newest complete tag.
    """
    root = checkpoint_root(output_dir)
    tags = complete_tags(root)
    return root / tags[-1] if tags else None


def resume_candidates(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, newest first (the order resume tries them in)."""
    root = checkpoint_root(output_dir)
    return [root / tag for tag in reversed(complete_tags(root))]


def pointer_problem(output_dir: str | os.PathLike) -> str | None:
    """Why ``checkpoints/latest`` cannot be followed as it is (None when it names the newest complete tag)."""
    root = checkpoint_root(output_dir)
    tags = complete_tags(root)
    if not tags:
        return None
    tag = _read_pointer(root)
    if tag is None:
        return f"{root / POINTER} is missing or empty"
    if tag not in tags:
        return f"{root / POINTER} names {tag!r}, which is not a complete checkpoint"
    if tag != tags[-1]:
        return (
            f"{root / POINTER} names {tag} but {tags[-1]} is complete and newer (a crash before the pointer)"
        )
    return None


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """The tag dir to resume from, before verification: ``"auto"`` (the run's newest complete checkpoint, if
    any), ``"none"``, or a path. Raises CheckpointError (a configuration mistake) for a bad value.

    A path may name a tag dir, a checkpoints dir, or a run dir.
    """
    if resume == "none":
        found = latest_checkpoint(output_dir)
        if found is not None:
            raise CheckpointError(
                f"--resume none: {output_dir} already holds checkpoints ({found.name}) and a fresh run would "
                "mix with them; continue with --resume auto or use a new --output-dir"
            )
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    try:
        found = find_checkpoint(resume)
    except CheckpointError as err:
        raise CheckpointError(f"--resume {resume}: {err}; pass auto, none or such a path") from None
    if not (found / MARKER).is_file():  # consolidation reads such dirs; a resume needs the whole state
        raise CheckpointError(
            f"--resume {resume}: {found} has no {MARKER} (a save that did not finish, or not this engine's "
            "checkpoint); pass auto, none or a complete checkpoint"
        )
    return found


def find_checkpoint(path: str | os.PathLike, tag: str | None = None) -> Path:
    """The tag dir a path names (the one function that resolves checkpoint paths): a tag dir itself, or, for
    a run dir or its ``checkpoints`` dir, the tag ``tag`` or else the newest complete checkpoint.

    A tag dir is one with ``complete.json``, or (given without ``tag``) one holding DeepSpeed model states.
    """
    path = Path(path)
    if tag is None and ((path / MARKER).is_file() or any(path.glob("*model_states.pt"))):
        return path
    run_dir = path.parent if path.name == "checkpoints" and not (path / "checkpoints").is_dir() else path
    root = checkpoint_root(run_dir)
    if tag is not None:
        if (root / tag).is_dir():
            return root / tag
        saved = ", ".join(complete_tags(root)) or "none"
        raise CheckpointError(f"{root} has no checkpoint {tag!r} (complete ones: {saved})")
    found = latest_checkpoint(run_dir)
    if found is not None:
        return found
    what = "does not exist" if not path.exists() else "holds no complete checkpoint"
    raise CheckpointError(
        f"{path} {what} (expected a tag dir with {MARKER}, a checkpoints dir or a run dir holding complete "
        "checkpoints)"
    )


def file_crc32(path: Path, chunk: int = 1 << 22) -> str:
    """CRC-32 of a file's bytes, as 8 hex digits (catches truncation and bit damage; not a security hash)."""
    crc = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def _tag_files(tag_dir: Path) -> list[str]:
    """Every regular file of a tag dir (recursive, relative names), marker and temp files excepted."""
    names = []
    for path in tag_dir.rglob("*"):
        rel = path.relative_to(tag_dir).as_posix()
        if path.is_file() and rel != MARKER and not path.name.startswith("."):
            names.append(rel)
    return sorted(names)


def _share(names: list[str], rank: int, world_size: int) -> list[str]:
    return names[rank::world_size]


def describe_files(tag_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "crc32"}}`` for files of a tag dir."""
    return {n: {"size": (tag_dir / n).stat().st_size, "crc32": file_crc32(tag_dir / n)} for n in names}


def verify_files(tag_dir: Path, recorded: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """Problems of the named files against the marker's record (empty when all match)."""
    problems = []
    for name in names:
        path, want = tag_dir / name, recorded[name]
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{path} is missing")
            continue
        if size != want["size"]:
            problems.append(f"{path} has {size} bytes, {want['size']} were written")
        elif file_crc32(path) != want["crc32"]:
            problems.append(f"{path} does not match its checksum (damaged after it was written)")
    return problems


def read_marker(tag_dir: Path) -> dict[str, Any]:
    """The marker of a tag dir; CheckpointError when it is not valid JSON."""
    try:
        return json.loads((tag_dir / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{tag_dir / MARKER} is unreadable ({err})") from err


def _gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1 or not torch_dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size
    torch_dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any, world_size: int) -> Any:
    if world_size == 1 or not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def _disk_needed_message(root: Path, tag_dir: Path, previous: Path | None, err: BaseException) -> str:
    free = shutil.disk_usage(root).free if root.exists() else 0
    if previous is not None:
        try:
            files = read_marker(previous).get("files") or {}
            need = sum(int(f["size"]) for f in files.values())
        except CheckpointError:
            need = 0
        need_text = f"about {need / 2**30:.2f} GiB (the size of {previous.name})" if need else "unknown space"
    else:
        need_text = "unknown space (no previous checkpoint to measure)"
    keep = f"checkpoints/latest still names {previous.name}" if previous else "no checkpoint was committed"
    return (
        f"no space left on device saving {tag_dir}: the checkpoint needs {need_text}, "
        f"{free / 2**30:.2f} GiB are free; free space or use another --output-dir ({keep}; {err})"
    )


def _is_out_of_space(err: BaseException, directory: Path) -> bool:
    """True for ENOSPC/EDQUOT anywhere in the exception chain, or when the filesystem is (nearly) full at the
    failure: torch's writers report a short write as "unexpected pos" or an iostream error, with no errno."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(err):
            return True
        err = err.__cause__ or err.__context__
    try:
        return shutil.disk_usage(directory).free < 16 * 2**20
    except OSError:
        return False


class _GuardedWrites:
    """Records (instead of raising) a failure of DeepSpeed's per-file writes inside ``save_checkpoint``, so
    that the collectives DeepSpeed runs around them stay aligned on every rank; the caller then agrees on the
    outcome with one gather."""

    def __init__(self, engine):
        self.engine, self.error = engine, None

    def __enter__(self) -> _GuardedWrites:
        ckpt_engine = self.engine.checkpoint_engine
        self._saved = ckpt_engine.__dict__.get("save")
        real = ckpt_engine.save

        def save(state_dict, path):
            if self.error is not None:
                return  # the first failure decides; do not fill the disk further
            try:
                real(state_dict, path)
            except Exception as err:  # noqa: BLE001 - reported collectively by the caller
                self.error = err

        ckpt_engine.save = save
        return self

    def __exit__(self, *exc) -> None:
        ckpt_engine = self.engine.checkpoint_engine
        if self._saved is None:
            del ckpt_engine.save
        else:
            ckpt_engine.save = self._saved


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, and the current CUDA device), as plain values and
    tensors only: the trainer file then loads with torch's weights-only unpickler (engine/safe_load.py)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = (name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
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
        return complete_tags(self.root)

    def clean_incomplete(self) -> list[str]:
        """Remove (rank 0) the tag dirs a crashed save left (no marker); all ranks wait.

        Only dirs without ``complete.json`` go: a complete checkpoint is never removed here, whatever
        ``latest`` says (docs/reliability.md).
        """
        removed = []
        if self.rank == 0 and self.root.is_dir():
            for path in self.root.iterdir():
                if step_of_tag(path.name) is not None and path.is_dir() and not (path / MARKER).is_file():
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path.name)
            for tmp in self.root.glob(f".{POINTER}.tmp*"):
                tmp.unlink(missing_ok=True)
        if removed:
            log.warning("removed incomplete checkpoint dirs %s (saves that did not finish)", sorted(removed))
        _barrier()
        return removed

    def select(self, resume: str, output_dir: str | os.PathLike) -> Path | None:
        """Collective: the verified checkpoint to resume from, the same on every rank (None: fresh start).

        ``auto`` tries the run's complete checkpoints newest first; one whose files do not match their
        record is set aside (renamed ``corrupt-<tag>-<time>``) with a warning naming the file, and the next
        is tried. An explicit tag dir that fails raises CheckpointError instead.
        """
        first = resolve_resume(resume, output_dir)  # every rank: a bad value raises everywhere
        candidates: list[Path] = []
        tag_given = first is not None and first == Path(resume)  # a tag dir, not a run dir, was named
        if first is not None:
            run_dir = first.parent.parent
            candidates = [first] if tag_given else resume_candidates(run_dir)
            problem = None if tag_given else pointer_problem(run_dir)
            if problem and self.rank == 0:
                log.warning("%s; resuming from the newest complete checkpoint", problem)
        candidates = [Path(c) for c in _broadcast([str(c) for c in candidates], self.world_size)]
        for candidate in candidates:
            problems = self._verify(candidate)
            if not problems:
                own = candidate.parent == self.root
                if self.rank == 0 and own and _read_pointer(self.root) != candidate.name:
                    self.commit(candidate.name)  # repair the pointer
                _barrier()
                return candidate
            if tag_given:
                raise CheckpointError(
                    f"--resume {resume}: {problems[0]}; resume from another checkpoint or with --resume none"
                )
            if self.rank == 0:
                log.warning("checkpoint %s is damaged: %s", candidate, "; ".join(problems[:5]))
                if candidate.parent == self.root:
                    self._set_aside(candidate)
            _barrier()
        if candidates:
            raise CheckpointError(
                f"every checkpoint under {candidates[0].parent} failed verification; restore the files, or "
                "start with --resume none in a new --output-dir"
            )
        return None

    def _verify(self, tag_dir: Path) -> list[str]:
        """Collective: every rank checks its share of the files the marker records; all problems, gathered."""
        try:
            marker = read_marker(tag_dir)
            recorded = marker.get("files")
            local = (
                []
                if recorded is None
                else verify_files(tag_dir, recorded, _share(sorted(recorded), self.rank, self.world_size))
            )
        except CheckpointError as err:
            local = [str(err)]
        return [p for rank_problems in _gather(local, self.world_size) for p in rank_problems]

    def _set_aside(self, tag_dir: Path) -> None:
        target = tag_dir.with_name(f"corrupt-{tag_dir.name}-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            tag_dir.rename(target)
            log.warning("set %s aside as %s; trying the previous checkpoint", tag_dir.name, target.name)
        except OSError as err:
            log.warning("could not set %s aside (%s); skipping it", tag_dir, err)

    def save(
        self, engine, step: int, rank_state: dict, run_state: dict, rank_files: dict | None = None
    ) -> Path:
        """Collective: DeepSpeed states, this rank's trainer file, checksums, then (rank 0) marker, pointer.

        ``rank_files``: more per-rank files, ``{stem: object}`` saved as ``<stem>_rank<r>.pt`` (an object of
        None: no file from this rank), checksummed like the rest (the EMA: engine/ema.py).
        A write that fails on any rank (a full disk: CheckpointSpaceError) fails the save on every rank
        after the partial tag dir is removed; ``latest`` keeps naming the last good checkpoint.
        """
        tag = tag_for_step(step)
        tag_dir = self.root / tag
        previous = latest_checkpoint(self.root.parent)
        if self.rank == 0 and tag_dir.exists():
            shutil.rmtree(tag_dir)  # a stale attempt at this step; the pointer never names it
        _barrier()
        with _GuardedWrites(engine) as guard:
            engine.save_checkpoint(
                str(self.root), tag=tag, client_state={"trainer_step": step}, save_latest=False
            )
        error = guard.error
        if error is None:
            try:
                tag_dir.mkdir(parents=True, exist_ok=True)
                path = tag_dir / f"trainer_rank{self.rank:05d}.pt"
                tmp = path.with_name(path.name + ".tmp")
                torch.save({**rank_state, "step": step, "world_size": self.world_size}, tmp)
                os.replace(tmp, path)
                for stem, obj in (rank_files or {}).items():
                    if obj is not None:
                        path = tag_dir / f"{stem}_rank{self.rank:05d}.pt"
                        tmp = path.with_name(path.name + ".tmp")
                        torch.save(obj, tmp)
                        os.replace(tmp, path)
            except Exception as err:  # noqa: BLE001 - agreed below
                error = err
        errors = [
            e
            for e in _gather(
                None if error is None else (repr(error), _is_out_of_space(error, self.root)), self.world_size
            )
            if e
        ]
        if errors:
            self._fail_save(tag_dir, previous, error, errors)
        # Every rank's files are on disk (the gather was a barrier): checksum a share each.
        names = _share(_tag_files(tag_dir), self.rank, self.world_size) if tag_dir.is_dir() else []
        files: dict[str, Any] = {}
        for part in _gather(describe_files(tag_dir, names), self.world_size):
            files.update(part)
        if self.rank == 0:
            marker = {**run_state, "step": step, "world_size": self.world_size, "files": files}
            atomic_write_bytes(tag_dir / MARKER, json.dumps(marker, indent=1, default=str).encode())
            self.commit(tag)
            self.prune()
        _barrier()
        return tag_dir

    def _fail_save(
        self, tag_dir: Path, previous: Path | None, error: BaseException | None, errors: list
    ) -> None:
        if self.rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)  # incomplete: free its space now
        _barrier()
        if any(out_of_space for _, out_of_space in errors):
            raise CheckpointSpaceError(
                _disk_needed_message(self.root, tag_dir, previous, error or RuntimeError(errors[0][0]))
            )
        raise CheckpointError(f"saving {tag_dir} failed on {len(errors)} rank(s): {errors[0][0]}")

    def commit(self, tag: str) -> None:
        """Point ``latest`` at ``tag`` (rank 0). The only write that makes a checkpoint current."""
        atomic_write_bytes(self.root / POINTER, tag.encode())

    def prune(self) -> None:
        """Delete the oldest complete checkpoints beyond ``keep_last``; never the pointer's target, nor the
        best evaluated checkpoint (``best.json``), which is kept beside the last ``keep_last``."""
        current = _read_pointer(self.root)
        best = read_best(self.root)
        protected = {current, best["tag"] if best else None}
        tags = [t for t in self.completed_tags() if t not in protected]
        excess = len(tags) + (current is not None) - self.keep_last
        for tag in tags[: max(excess, 0)]:
            shutil.rmtree(self.root / tag, ignore_errors=True)

    def load(self, engine, tag_dir: Path) -> tuple[dict | None, dict]:
        """Load DeepSpeed states into ``engine``; return this rank's trainer state (None if the world size
        changed, so per-rank data and RNG cannot be mapped) and the run state from the marker."""
        run_state = read_marker(tag_dir)
        load_dir, tag = tag_dir.parent, tag_dir.name
        if run_state["world_size"] != self.world_size and engine.zero_optimization_stage() > 0:
            # ZeRO shards of another world size: the universal copy that engine/reshard.py made before the
            # engine was built with checkpoint.load_universal.
            if not engine.load_universal_checkpoint() or not is_converted(tag_dir):
                raise CheckpointError(
                    f"{tag_dir} holds ZeRO shards of {run_state['world_size']} ranks, this run has "
                    f"{self.world_size}; build the Trainer (which converts them) rather than loading directly"
                )
            load_dir, tag = tag_dir, UNIVERSAL_TAG
        load_path, _ = engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
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
        return load_file(path), run_state


def universal_dir(tag_dir: Path) -> Path:
    """Where engine/reshard.py puts the universal conversion of the ZeRO checkpoint in ``tag_dir``."""
    return tag_dir / UNIVERSAL_TAG


def is_converted(tag_dir: Path) -> bool:
    """True when ``<tag dir>/universal`` holds a complete conversion (its marker is written last)."""
    return (universal_dir(tag_dir) / UNIVERSAL_MARKER).is_file()


def trained_global_batch(tag_dir: os.PathLike | None) -> int | None:
    """The global batch (``train_batch_size``) the checkpoint ``tag_dir`` was trained with, from its marker;
    None for a fresh run (``tag_dir`` None) or a marker that does not record it."""
    if tag_dir is None:
        return None
    try:
        value = (read_marker(Path(tag_dir)).get("ds_config") or {}).get("train_batch_size")
    except CheckpointError:
        return None  # the trainer reports an unreadable marker when it resumes
    return value if isinstance(value, int) and value > 0 else None
