"""Keep the best evaluated checkpoint: the selection rule, and its record across saves and resumes.

A program names one scalar its ``eval_fn`` returns and whether higher or lower is better
(``TrainSettings.best_metric`` / ``best_mode``); the engine knows nothing else about it. When an evaluation
improves on the best so far, the trainer checkpoints that step and records it:

- in the checkpoint's own marker (``complete.json["best"]``: the best as known at that step), which is what a
  resume restores, so a resumed run compares against the best so far and never replaces a better best with
  a worse one;
- in ``checkpoints/best.json`` (tag, step, metric, value, mode), written after the checkpoint is committed;
  :meth:`~beit3.engine.checkpoint.CheckpointManager.prune` never deletes the tag it names, so the best
  checkpoint is kept beside the last ``keep_last`` ones. A resume rewrites the file from the marker (a crash
  between the two writes leaves it one best behind).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch.distributed as torch_dist

from beit3.engine.checkpoint import MARKER, tag_for_step
from beit3.engine.errors import EngineError

log = logging.getLogger(__name__)

MODES = ("max", "min")
OFF = ("", "none")  # best_metric values that keep no best checkpoint


class BestMetricError(EngineError, ValueError):
    """``train.best_metric`` names a scalar the evaluation does not return."""


def is_better(value: float, best: float | None, mode: str) -> bool:
    """True when ``value`` improves on ``best`` (None: nothing yet) under ``mode``; NaN never improves."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


class KeepBest:
    """The best-so-far value of one evaluation scalar, and the checkpoint that holds it."""

    def __init__(self, metric: str, mode: str = "max"):
        self.metric, self.mode = metric, mode
        self.record: dict | None = None  # {"metric", "mode", "value", "step", "tag"}

    @property
    def enabled(self) -> bool:
        """Whether a metric is selected at all."""
        return self.metric not in OFF

    def restore(self, record: dict | None, root: Path) -> None:
        """Take the best recorded in a resumed checkpoint's marker; dropped (with a warning) when it was
        selected by another metric or mode, or its checkpoint is gone from ``root``."""
        self.record = None
        if not self.enabled or not record:
            return
        if (record.get("metric"), record.get("mode")) != (self.metric, self.mode):
            log.warning(
                "the resumed checkpoint's best was selected by %s (%s), this run selects by %s (%s): "
                "the best starts anew", record.get("metric"), record.get("mode"), self.metric, self.mode,
            )  # fmt: skip
            return
        if not (root / record["tag"] / MARKER).is_file():
            log.warning("the best checkpoint %s is gone from %s: the best starts anew", record["tag"], root)
            return
        self.record = dict(record)

    def offer(self, scalars: dict[str, float], step: int, world_size: int = 1) -> bool:
        """Compare the evaluation at ``step``; True (and the record updated) when it is the new best.

        Collective when ``world_size`` > 1: rank 0's value decides on every rank, so that all take the
        same save. An evaluation that returned nothing is not compared.
        """
        if not self.enabled or not scalars:
            return False
        if self.metric not in scalars:
            raise BestMetricError(
                f"train.best_metric={self.metric!r} is not among the evaluation's scalars "
                f"({', '.join(sorted(scalars))}): set it to one of them, or to 'none'"
            )
        value = float(scalars[self.metric])
        if world_size > 1 and torch_dist.is_initialized():
            box = [value]
            torch_dist.broadcast_object_list(box, src=0)
            value = box[0]
        if not is_better(value, self.record["value"] if self.record else None, self.mode):
            return False
        self.record = {"metric": self.metric, "mode": self.mode, "value": value, "step": step,
                       "tag": tag_for_step(step)}  # fmt: skip
        return True
