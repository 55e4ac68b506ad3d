"""The task protocol: all the engine knows about the model it trains (see docs/architecture.md).

Its counterpart for the batches, the data-source protocol, is :mod:`beit3.engine.data_source`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class TaskModule(Protocol):
    """A ``torch.nn.Module`` the engine wraps in DeepSpeed.

    Every optimizer step must touch every trainable parameter on every rank, in the same order: ZeRO-3
    re-applies the stale gradient of a parameter unused in a step (docs/engine.md).
    Under bf16/fp16 DeepSpeed casts the module's parameters but not its inputs: ``forward`` casts floating
    inputs to its parameter dtype and should compute its loss in fp32.
    """

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """Scalar loss and flat per-micro-batch metrics named as TensorBoard tags (``loss/mlm``)."""
        ...

    def prepare_batch(self, batch: Any, device: torch.device) -> Any:
        """Move the batch to ``device`` and run frozen preprocessing outside DeepSpeed."""
        ...

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups; a group may carry ``lr_scale`` (default 1) and ``weight_decay``."""
        ...

    def batch_stats(self, batch: Any) -> dict[str, float]:
        """``samples`` (int), ``tokens`` (int) and ``flops`` (training FLOPs of the micro-batch); optionally
        ``unpadded_flops``, what its real tokens need if padding were not computed (default: ``flops``), and
        ``recompute_flops``, what activation checkpointing runs again in the backward (default 0; the HFU)."""
        ...


REQUIRED_METHODS = ("forward", "prepare_batch", "param_groups", "batch_stats")
# Optional: ``zero3_gather_units() -> list[torch.nn.Module]``, modules whose parameters ZeRO-3 gathers (and
# releases) as one unit, all of a unit's parameters before its forward: DeepSpeed's "leaf" modules, whose
# submodules get no hooks of their own. A task that compiles parts of its model declares them (a hook
# inside a compiled region is a graph break there). See :func:`zero3_gather_units`.


def zero3_gather_units(task: Any) -> list[torch.nn.Module]:
    """The modules the task declares as ZeRO-3 gathering units ([] when it declares none)."""
    units = getattr(task, "zero3_gather_units", None)
    if units is None:
        return []
    found = list(units())
    owned = {id(m) for m in task.modules()}
    foreign = [type(m).__name__ for m in found if not isinstance(m, torch.nn.Module) or id(m) not in owned]
    if foreign:
        raise TypeError(
            f"zero3_gather_units() of {type(task).__name__} returned {foreign}: not its submodules"
        )
    return found


def check_task(task: Any) -> None:
    """Raise TypeError naming the missing methods if ``task`` does not follow the protocol."""
    if not isinstance(task, torch.nn.Module):
        raise TypeError(f"the task must be a torch.nn.Module, got {type(task).__name__}")
    missing = [name for name in REQUIRED_METHODS if not callable(getattr(task, name, None))]
    if missing:
        raise TypeError(f"task {type(task).__name__} lacks {', '.join(missing)} (see beit3.engine.task)")
