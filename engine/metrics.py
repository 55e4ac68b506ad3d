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
# Memory of each device variant the capacity planner (beit3.pretrain.plan) plans for, in bytes as nvidia-smi
# reports it (A100 40 GB: 40960 MiB, ...); the part before "-" names its PEAK_FLOPS entry.
DEVICE_MEMORY = {
    "A100-40GB": 40960 * 2**20,
    "A100-80GB": 81920 * 2**20,
    "H100-80GB": 81559 * 2**20,
    "H200-141GB": 143771 * 2**20,
}
# NVLink bandwidth per GPU and direction, bytes/s (SXM parts: NVLink 3 600 GB/s, NVLink 4 900 GB/s both ways).
NVLINK_BANDWIDTH = {"A100": 300e9, "H100": 450e9, "H200": 450e9}


def device_peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """The dense bf16 peak of ``device`` (None on CPU or an unknown GPU, where MFU is not logged)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


class MetricAccumulator:
    """Per-metric sums and counts of micro-batch metrics, kept on the device until ``reduce``.

    A metric a micro-batch does not report is simply not counted for it, so tasks may report a metric only
    when it applies (``acc/mim`` only with images); ranks may even differ in the names they saw.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        """Add one micro-batch's metrics (tensors stay on the device: no host sync)."""
        for name, value in metrics.items():
            if torch.is_tensor(value):
                value = value.detach().float().to(self.device)
            else:
                # A fill kernel, not torch.tensor(): a pageable host-to-device copy would sync the stream.
                value = torch.full((), float(value), device=self.device)
            self._add(name, value.reshape(()), 1)

    def _add(self, name: str, value: torch.Tensor, count: int) -> None:
        self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.counts[name] = self.counts.get(name, 0) + count

    def merge(self, other: MetricAccumulator) -> None:
        """Add another accumulator's sums (a finished step's metrics into the log window)."""
        for name, value in other.sums.items():
            self._add(name, value, other.counts[name])

    def reduce(
        self, names: list[str] | None = None, extra: dict[str, float] | None = None
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Means over micro-batches and ranks of the metrics ``names`` (default: those seen here; every rank
        must pass the same list), and cross-rank sums of the ``extra`` host numbers (same keys on every rank).

        One all-reduce and one host sync for everything; a metric no rank saw is left out.
        """
        names = sorted(self.sums) if names is None else list(names)
        extra = dict(sorted((extra or {}).items()))
        dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        zero = torch.zeros((), device=self.device)
        host_numbers = [float(self.counts.get(n, 0)) for n in names] + [float(v) for v in extra.values()]
        if not names and not host_numbers:
            return {}, {}
        sums = torch.stack([self.sums.get(n, zero) for n in names]) if names else zero.new_zeros(0)
        # One host-to-device copy for the counts and host numbers (this step syncs anyway).
        flat = torch.cat([sums.to(dtype), torch.tensor(host_numbers, dtype=dtype).to(self.device)])
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            torch_dist.all_reduce(flat)
        host, n = flat.tolist(), len(names)
        means = {name: host[i] / host[n + i] for i, name in enumerate(names) if host[n + i] > 0}
        return means, {k: host[2 * n + i] for i, k in enumerate(extra)}


def format_console(step: int, total: int, scalars: dict[str, float]) -> str:
    """One line: ``step 10/100 | loss/total 2.31 | optim/lr 1.2e-04 | ... | data/skipped 3``.

    Every scalar is shown except the data pipeline's per-kind counters (``data/...``), which TensorBoard
    keeps: the console sums the ``data/skipped/*`` ones into one ``data/skipped`` total.
    """
    parts = [f"step {step}/{total}"]
    skipped = None
    for name, value in scalars.items():
        if name.startswith("data/"):
            if name.startswith("data/skipped/"):
                skipped = (skipped or 0) + value
            continue
        parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    if skipped is not None:
        parts.append(f"data/skipped {skipped:g}")
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


def read_scalars(run_dir: str | os.PathLike) -> dict[str, dict[int, float]]:
    """Tag -> step -> value from every TensorBoard event file of the run directory ``run_dir`` (what
    :class:`MetricsWriter` wrote under ``run_dir/tensorboard``), in step order. Files are read oldest first,
    so a step that a resumed run logged again has the resumed run's value. The project's one reader of event
    files (tests, the quickstart summary and the benchmarks use it)."""
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = {}
    files = sorted((Path(run_dir) / "tensorboard").rglob("events.out.tfevents.*"), key=os.path.getmtime)
    for events in files:
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: dict(sorted(steps.items())) for tag, steps in values.items()}
