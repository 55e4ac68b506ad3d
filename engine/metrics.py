"""Training metrics: device-side accumulation, one cross-rank reduction per log step, TensorBoard + console.

Tags are an interface (docs/engine.md): task metrics under their own names, ``loss/total``, ``optim/*``,
``perf/*``, ``memory/*`` and ``data/*``.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.distributed as torch_dist

log = logging.getLogger(__name__)

# Dense bf16 peak per device (TFLOP/s x 1e12), matched against torch.cuda.get_device_name().
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def device_peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """The dense bf16 peak of ``device`` (None on CPU or an unknown GPU, where MFU is not logged)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


class MetricAccumulator:
    """Sums of per-micro-batch metrics kept on the device; reduced across ranks only by ``reduce``.

    Every rank must report the same metric names (the reduction is one flat all-reduce in sorted order).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        """Add one micro-batch's metrics (tensors stay on the device: no host sync)."""
        for name, value in metrics.items():
            value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            value = value.to(self.device)
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += 1

    def merge(self, other: MetricAccumulator) -> None:
        """Add another accumulator's sums (a finished step's metrics into the log window)."""
        for name, value in other.sums.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += other.count

    def reduce(self, extra: dict[str, float] | None = None) -> tuple[dict[str, float], dict[str, float]]:
        """Means over micro-batches and ranks of the metrics, and cross-rank sums of ``extra`` host numbers.

        One all-reduce and one host sync for everything.
        """
        names, extra = sorted(self.sums), dict(sorted((extra or {}).items()))
        values = [self.sums[n].reshape(()) for n in names]
        values.append(torch.tensor(float(self.count), device=self.device))
        values += [torch.tensor(float(v), device=self.device) for v in extra.values()]
        flat = torch.stack(values).double() if self.device.type == "cpu" else torch.stack(values)
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            torch_dist.all_reduce(flat)
        host = flat.tolist()
        count = max(host[len(names)], 1.0)
        means = {n: host[i] / count for i, n in enumerate(names)}
        sums = {k: host[len(names) + 1 + i] for i, k in enumerate(extra)}
        return means, sums

    def reset(self) -> None:
        """Start a new window."""
        self.sums, self.count = {}, 0


def format_console(step: int, total: int, scalars: dict[str, float]) -> str:
    """One line: ``step 10/100 | loss/total 2.31 | optim/lr 1.2e-04 | ...``."""
    parts = [f"step {step}/{total}"]
    for name, value in scalars.items():
        parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return " | ".join(parts)


class MetricsWriter:
    """Rank-0 TensorBoard SummaryWriter (``<output_dir>/tensorboard``) plus one console line per log step."""

    def __init__(
        self,
        log_dir: str | os.PathLike,
        enabled: bool = True,
        tensorboard: bool = True,
        total_steps: int = 0,
        printer=print,
        purge_step: int | None = None,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.printer = printer
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Write every finite-or-not scalar under its tag at ``step`` and print the console line."""
        if not self.enabled:
            return
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, global_step=step)
            self.writer.flush()
        shown = {k: v for k, v in scalars.items() if not (isinstance(v, float) and math.isnan(v))}
        self.printer(format_console(step, self.total_steps, shown), flush=True)

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
