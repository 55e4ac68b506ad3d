"""An exponential moving average of the weights, kept where each rank keeps its weights (ZeRO 0-3).

The semantics are those of timm's ``ModelEma`` (what the released BEiT-3 finetuning recipes use): after every
optimizer step, ``ema = decay x ema + (1 - decay) x weights`` for every parameter and every floating-point
buffer of the state dict, starting from the weights the run starts with. Here:

- only optimizer steps that really ran update it (a step skipped on a non-finite loss or an fp16 overflow
  leaves weights and EMA alone);
- trainable parameters only: a frozen parameter never changes, so its average is itself (timm's copy of it
  would cost memory and give the same values); floating persistent buffers as in timm, integer ones not
  averaged (the live value is used, as timm's ModelEmaV3 copies them);
- each value is an fp32 average of the rank's LOCAL storage: under ZeRO-3 the rank's partition of the
  parameter (``param.ds_tensor``, its valid elements), so memory per rank is the rank's share; otherwise
  (ZeRO 0-2) the full parameter, as every rank holds it.

timm's classes deep-copy the module: under ZeRO-3 that copies empty tensors (a partitioned parameter holds
no data outside a gather), so they cannot be used here (docs/engine.md, "EMA of the weights").

:meth:`WeightEma.swapped` puts the averages into that local storage for an evaluation (the task's ordinary
forward, ZeRO-3 gathering the partitions as usual) and puts the trained values back bit for bit.

Checkpoints (``ema_rank<r>.pt`` in the tag dir, through :meth:`state_dict`): whole tensors are written by
rank 0 only (as DeepSpeed writes ZeRO 0-2 module states once), partitions by their rank. DeepSpeed's ZeRO-3
rule (partition_parameters.py, ``_partition_param``): a parameter of N elements is flattened and padded to
``ceil(N / W) x W`` elements; rank r holds ``[r x ceil(N / W), (r + 1) x ceil(N / W))``. Each file records
every partition's start and valid length, so a resume on another world size (or another stage) rebuilds each
parameter from the saved pieces and takes the new rank's share (:meth:`load`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from beit3.engine.errors import CheckpointError, EngineError
from beit3.engine.safe_load import load_file

log = logging.getLogger(__name__)

FORMAT = 1
FILE_STEM = "ema"  # ema_rank00000.pt, ... in a checkpoint's tag dir


class EmaError(EngineError, RuntimeError):
    """The EMA cannot follow this module's storage (a partitioning it does not know) or was misused."""


def ema_file(tag_dir: str | Path, rank: int) -> Path:
    """The EMA file rank ``rank`` writes into a checkpoint's tag dir."""
    return Path(tag_dir) / f"{FILE_STEM}_rank{rank:05d}.pt"


def partition_range(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """(start, valid length) of rank ``rank``'s ZeRO-3 partition of a flattened parameter of ``numel``
    elements: ``world_size`` equal chunks of ``ceil(numel / world_size)``, the last ones padded."""
    size = math.ceil(numel / world_size)
    start = size * rank
    return start, max(0, min(size, numel - start))


@dataclass
class _Slot:
    """One averaged tensor: its name, a getter of the live tensor, and where this rank's piece lies."""

    name: str
    kind: str  # "param" | "buffer"
    live: Callable[[], torch.Tensor]
    numel: int
    shape: tuple[int, ...]
    start: int | None  # None: the whole tensor is local; else the offset of this rank's partition
    length: int  # elements held locally (whole: numel)
    ema: torch.Tensor  # fp32; whole: the tensor's shape; partition: 1-D of ``length``

    def local(self) -> torch.Tensor:
        """The live local storage this slot averages (a view: writes reach the parameter)."""
        tensor = self.live()
        if self.start is None:
            return tensor.data
        return tensor.ds_tensor.data.view(-1).narrow(0, 0, self.length)


def _persistent_buffers(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The floating-point buffers ``state_dict`` holds (non-persistent ones are not the model's state)."""
    seen: set[int] = set()
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is None or name in sub._non_persistent_buffers_set or id(buf) in seen:
                continue
            seen.add(id(buf))
            if buf.is_floating_point():
                yield (f"{prefix}.{name}" if prefix else name), buf


class WeightEma:
    """fp32 EMA of a (DeepSpeed-wrapped) module's trainable parameters and floating buffers, per rank.

    Build it after ``deepspeed.initialize`` (ZeRO-3 partitions exist then); it starts from the current
    weights. ``rank``/``world_size``: this rank among the data-parallel ranks that partition ZeRO-3
    parameters (the engine's whole world); ``optimizer``: the DeepSpeed ZeRO-3 optimizer, whose release and
    re-gather of parameters :meth:`swapped` uses (needed when the module is ZeRO-3 partitioned).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        decay: float,
        rank: int = 0,
        world_size: int = 1,
        optimizer: Any = None,
    ):
        if not 0.0 <= decay < 1.0:
            raise EmaError(f"EMA decay {decay!r} outside [0, 1): set train.ema_decay (e.g. 0.9999)")
        self.module, self.decay, self.rank, self.world_size = module, float(decay), rank, world_size
        self.updates = 0  # EMA updates so far (real optimizer steps)
        self.active = False  # inside swapped()
        self.slots: list[_Slot] = []
        for name, param in module.named_parameters():
            if param.requires_grad:
                self.slots.append(self._slot(name, "param", param, _getter(module, name, "param")))
        for name, buf in _persistent_buffers(module):
            self.slots.append(self._slot(name, "buffer", buf, _getter(module, name, "buffer")))
        self._zero3 = None
        if any(s.start is not None for s in self.slots):
            if not hasattr(optimizer, "checkpoint_event_prologue"):
                raise EmaError("a ZeRO-3 partitioned module needs its DeepSpeed optimizer: WeightEma(..., "
                               "optimizer=engine.optimizer)")  # fmt: skip
            self._zero3 = optimizer
        self.reset()

    def _slot(self, name: str, kind: str, tensor: torch.Tensor, live: Callable) -> _Slot:
        ds_tensor = getattr(tensor, "ds_tensor", None)
        if ds_tensor is None:
            shape = tuple(tensor.shape)
            ema = torch.empty(shape, dtype=torch.float32, device=tensor.device)
            return _Slot(name, kind, live, tensor.numel(), shape, None, tensor.numel(), ema)
        numel, shape = int(tensor.ds_numel), tuple(tensor.ds_shape)
        start, length = partition_range(numel, self.world_size, self.rank)
        if ds_tensor.ds_numel != math.ceil(numel / self.world_size):
            raise EmaError(
                f"{name}: ZeRO-3 partition of {ds_tensor.ds_numel} elements, expected ceil({numel} / "
                f"{self.world_size}); the EMA follows partitions over the whole data-parallel world only "
                "(not MiCS shards): set train.ema_decay = 0 or use a config without mics_shard_size"
            )
        if str(getattr(ds_tensor, "final_location", None)).endswith("nvme"):
            raise EmaError(f"{name}: parameters offloaded to NVMe are not supported with train.ema_decay > 0")
        ema = torch.empty(length, dtype=torch.float32, device=ds_tensor.device)
        return _Slot(name, kind, live, numel, shape, start, length, ema)

    @property
    def local_elements(self) -> int:
        """fp32 elements this rank's EMA holds (its memory is 4 bytes each)."""
        return sum(s.ema.numel() for s in self.slots)

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average from the current weights."""
        for slot in self.slots:
            slot.ema.copy_(slot.local())

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step toward the current weights: ``ema += (1 - decay) x (weights - ema)``."""
        if self.active:
            raise EmaError("WeightEma.update() inside swapped(): the parameters hold the EMA values")
        weight = 1.0 - self.decay
        fp32: dict[torch.device, tuple[list, list]] = {}  # one multi-tensor lerp per device
        for slot in self.slots:
            local = slot.local()
            if local.dtype == torch.float32:
                emas, values = fp32.setdefault(local.device, ([], []))
                emas.append(slot.ema)
                values.append(local)
            else:  # bf16/fp16 weights: converted one tensor at a time
                slot.ema.lerp_(local.float(), weight)
        for emas, values in fp32.values():
            torch._foreach_lerp_(emas, values, weight)
        self.updates += 1

    # ----- evaluation with the EMA weights -----
    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Collective under ZeRO-3 (call on every rank): within it the module's weights are the EMA values
        (cast to the module's dtype); on exit every parameter and buffer holds its trained bits again.

        Under ZeRO-3 the averages go into each rank's partition (``ds_tensor``), which the forward gathers.
        Around each copy DeepSpeed's own pair for a checkpoint save runs (``checkpoint_event_prologue``:
        every gathered parameter released, so none keeps full data of the other weights;
        ``..._epilogue``: ZeRO++ hpZ secondary partitions dropped, persistent parameters gathered again
        from the partitions), so no gather serves the other weights and nothing full-sized is copied.
        """
        if self.active:
            raise EmaError("WeightEma.swapped() is already active")
        saved: list[torch.Tensor] = []
        try:
            with torch.no_grad():
                self._release_gathered()
                for slot in self.slots:
                    local = slot.local()
                    saved.append(local.clone())
                    local.copy_(slot.ema)
                self._regather_persistent()
            self.active = True
            yield
        finally:
            with torch.no_grad():
                self._release_gathered()
                for slot, value in zip(self.slots, saved, strict=False):  # only those swapped in
                    slot.local().copy_(value)
                self._regather_persistent()
            self.active = False

    def _release_gathered(self) -> None:
        if self._zero3:
            self._zero3.checkpoint_event_prologue()

    def _regather_persistent(self) -> None:
        if self._zero3:
            self._zero3.checkpoint_event_epilogue()

    # ----- checkpoints -----
    def record(self) -> dict:
        """What a checkpoint's marker records about the EMA (the resume reads it first)."""
        partitioned = any(s.start is not None for s in self.slots)
        return {"decay": self.decay, "updates": self.updates, "world_size": self.world_size,
                "files": self.world_size if partitioned else 1}  # fmt: skip

    def state_dict(self) -> dict | None:
        """This rank's EMA file content (None: nothing to write on this rank). Whole tensors go into rank
        0's file only; partitions into their rank's, each with its start."""
        tensors = {s.name: s.ema for s in self.slots if s.start is not None or self.rank == 0}
        if not tensors:
            return None
        chosen = [s for s in self.slots if s.name in tensors]
        return {
            "format": FORMAT,
            "rank": self.rank,
            "world_size": self.world_size,
            "decay": self.decay,
            "updates": self.updates,
            "tensors": tensors,
            "starts": {s.name: s.start for s in chosen if s.start is not None},
            "numel": {s.name: s.numel for s in chosen},
            "shape": {s.name: list(s.shape) for s in chosen},
            "kind": {s.name: s.kind for s in chosen},
        }

    @torch.no_grad()
    def load(self, tag_dir: str | Path, record: dict) -> None:
        """Take the EMA saved in ``tag_dir`` (its marker's ``record``): exact at the same world size and
        layout; otherwise each tensor rebuilt from the saved pieces and this rank's share taken."""
        reader = EmaReader(tag_dir, record)
        for slot in self.slots:
            start = 0 if slot.start is None else slot.start
            value = reader.read(slot.name, slot.numel, start, slot.length)
            slot.ema.copy_(value.view(slot.ema.shape))
        self.updates = int(record.get("updates", 0))
        if float(record.get("decay", self.decay)) != self.decay:
            log.warning("the checkpoint's EMA was kept with decay %s; continuing with %s", record["decay"],
                        self.decay)  # fmt: skip


class EmaReader:
    """The EMA files of one checkpoint, opened lazily (memory-mapped): any element range of any tensor."""

    def __init__(self, tag_dir: str | Path, record: dict):
        self.tag_dir, self.record = Path(tag_dir), record
        self.world_size = int(record["world_size"])
        self._files: dict[int, dict] = {}

    def file(self, rank: int) -> dict:
        if rank not in self._files:
            path = ema_file(self.tag_dir, rank)
            if not path.is_file():
                raise CheckpointError(
                    f"{path} is missing: the checkpoint's EMA state is incomplete; resume from another "
                    "checkpoint, or with train.ema_decay = 0"
                )
            state = load_file(path, mmap=True)
            if state.get("format") != FORMAT:
                raise CheckpointError(f"{path}: EMA format {state.get('format')!r}, this engine reads "
                                      f"{FORMAT}")  # fmt: skip
            self._files[rank] = state
        return self._files[rank]

    def names(self) -> dict[str, tuple[int, list[int], str]]:
        """name -> (numel, shape, kind) of every saved tensor (rank 0's file lists them all)."""
        head = self.file(0)
        return {n: (head["numel"][n], head["shape"][n], head["kind"][n]) for n in head["tensors"]}

    def read(self, name: str, numel: int, start: int, length: int) -> torch.Tensor:
        """Elements ``[start, start + length)`` of the flattened tensor ``name`` (fp32, 1-D)."""
        head = self.file(0)
        if name not in head["tensors"]:
            raise CheckpointError(
                f"{self.tag_dir}: the saved EMA has no {name!r} (the model changed?); resume with "
                "train.ema_decay = 0, or from a checkpoint of this model"
            )
        if head["numel"][name] != numel:
            raise CheckpointError(
                f"{self.tag_dir}: the saved EMA of {name!r} has {head['numel'][name]} elements, the model "
                f"{numel}; resume from a checkpoint of this model"
            )
        out = torch.empty(length, dtype=torch.float32)
        if name not in head["starts"]:  # whole, in rank 0's file
            out.copy_(head["tensors"][name].reshape(-1).narrow(0, start, length))
            return out
        size = math.ceil(numel / self.world_size)
        end = start + length
        rank = start // size if size else self.world_size  # the first saved partition that overlaps
        while rank < self.world_size and rank * size < end:
            state = self.file(rank)
            piece_start = state["starts"][name]
            if piece_start != rank * size:
                raise CheckpointError(
                    f"{ema_file(self.tag_dir, rank)}: partition of {name!r} starts at {piece_start}, "
                    f"expected {rank * size} (ceil({numel} / {self.world_size}) x {rank})"
                )
            piece = state["tensors"][name].reshape(-1)
            lo, hi = max(start, piece_start), min(end, piece_start + piece.numel())
            if lo < hi:
                out.narrow(0, lo - start, hi - lo).copy_(piece.narrow(0, lo - piece_start, hi - lo))
            rank += 1
        return out


def ema_state_dict(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 EMA tensors of a checkpoint, by the module's parameter and buffer names (empty when
    the checkpoint holds no EMA). Partitions are put together in rank order, their padding dropped."""
    from beit3.engine.checkpoint import read_marker

    record = read_marker(Path(tag_dir)).get("ema")
    if not record:
        return {}
    reader = EmaReader(tag_dir, record)
    return {name: reader.read(name, numel, 0, numel).view(shape)
            for name, (numel, shape, _) in reader.names().items()}  # fmt: skip


def _getter(module: torch.nn.Module, name: str, kind: str) -> Callable[[], torch.Tensor]:
    """The live tensor by name (looked up each time: a module may rebind a buffer)."""
    if kind == "param":
        return lambda: module.get_parameter(name)
    return lambda: module.get_buffer(name)
