"""The training loop shared by pretraining and finetuning: DeepSpeed, LR, metrics, checkpoints, signals.

Per micro-batch: ``task.prepare_batch`` (outside the DeepSpeed module), ``engine(batch)``,
``engine.backward(loss)``, ``engine.step()``. Host syncs: one per optimizer step (a two-element all-reduce
read just before the optimizer step, carrying the non-finite-loss flag and the preemption flag) and one
per log step (the metric reduction). See docs/engine.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

from beit3.engine.best import KeepBest
from beit3.engine.checkpoint import (
    CheckpointManager,
    atomic_write_bytes,
    capture_rng,
    read_marker,
    restore_rng,
    write_best,
)
from beit3.engine.data_source import DataSource, check_data_source, counter_values
from beit3.engine.data_source import close as close_data
from beit3.engine.ds_config import precision_of
from beit3.engine.ema import FILE_STEM as EMA_FILE_STEM
from beit3.engine.ema import WeightEma
from beit3.engine.launch import DistInfo, shutdown_distributed
from beit3.engine.lr import lr_at
from beit3.engine.metrics import MetricAccumulator, MetricsWriter, device_peak_flops
from beit3.engine.optim import StepGuard, build_optimizer
from beit3.engine.reshard import ensure_universal, plan_resume
from beit3.engine.safe_load import guard_engine
from beit3.engine.supervise import EXIT_HUNG, EXIT_NONFINITE, EXIT_PREEMPTED, pending_signal
from beit3.engine.task import check_task, zero3_gather_units
from beit3.engine.trainer_config import EMA_PREFIX, TrainerConfig, TrainResult
from beit3.engine.watchdog import Watchdog, limit_from_env

log = logging.getLogger(__name__)

__all__ = [
    "EXIT_HUNG",
    "EXIT_NONFINITE",
    "EXIT_PREEMPTED",
    "TrainResult",
    "Trainer",
    "TrainerConfig",
    "seed_everything",
]
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Trains a task module (beit3.engine.task) on a data source (beit3.engine.data_source) with DeepSpeed;
    ``fit()`` runs to total_steps or a stop."""

    def __init__(
        self,
        task: torch.nn.Module,
        data: DataSource,
        ds_config: dict,
        cfg: TrainerConfig,
        dist: DistInfo,
        eval_fn: Callable[[int], dict[str, float]] | None = None,
    ):
        import deepspeed

        check_task(task)
        check_data_source(data)
        cfg.validate()
        self.task, self.data, self.cfg, self.dist, self.eval_fn = task, data, cfg, dist, eval_fn
        self.ds_config = ds_config
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        self.ckpt = CheckpointManager(cfg.output_dir, dist.rank, dist.world_size, cfg.keep_last)
        # Chosen before the engine exists: verified, agreed across ranks (docs/reliability.md).
        self.ckpt.clean_incomplete()
        self.resume_dir = self.ckpt.select(cfg.resume, cfg.output_dir)
        # Another world size: keep the global batch, convert ZeRO shards to the universal format (reshard.py).
        plan = plan_resume(self.resume_dir, ds_config, dist.world_size)
        if plan is not None:
            ds_config = self.ds_config = plan.ds_config
            if plan.universal:
                ensure_universal(plan.tag_dir, dist.rank)
        seed_everything(cfg.seed + dist.rank)
        task.to(dist.device)  # before the optimizer: torch's fused AdamW wants its parameters on the GPU
        optimizer = build_optimizer(
            task.param_groups(),
            cfg.optimizer,
            cfg.lr,
            tuple(cfg.betas),
            cfg.eps,
            cfg.weight_decay,
            dist.device,
        )
        self.guard = StepGuard(optimizer)
        # DeepSpeed's fp16/bf16 wrappers without ZeRO call the base step once with zero gradients to create
        # the optimizer state: with AdamW that is a weight-decay update and one more step in the bias
        # correction. The guard makes it a no-op; AdamW creates its state lazily at the first real step.
        self.guard.skip = True
        units = zero3_gather_units(task)
        if units and ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
            from deepspeed.utils import set_z3_leaf_module

            for module in units:  # before initialize, which registers ZeRO-3's hooks
                set_z3_leaf_module(module, True)
        try:
            self.engine, _, _, _ = deepspeed.initialize(
                model=task,
                optimizer=optimizer,
                config=plan.init_config if plan is not None else ds_config,
                dist_init_required=False,
            )
        finally:
            self.guard.skip = False
        self.guard.skipped = 0
        guard_engine(self.engine)  # DeepSpeed's own loads unpickle in full: refuse unknown types instead
        self.gas = self.engine.gradient_accumulation_steps()
        # DeepSpeed computes no gradient norm for plain fp32 without ZeRO: the trainer does, at log steps.
        self._own_grad_norm = self.engine.zero_optimization_stage() == 0 and precision_of(ds_config) == "fp32"
        self._grad_norm: torch.Tensor | None = None
        self.step, self.skipped_steps, self.nonfinite_in_row, self.last_saved = 0, 0, 0, -1
        self.peak_flops = device_peak_flops(dist.device, cfg.peak_flops)
        self._stop_signal = 0
        self.best = KeepBest(cfg.best_metric, cfg.best_mode)  # restored by _resume (engine/best.py)
        rng_state = self._resume()
        self.ema = self._build_ema()  # after the resume: it starts from the weights run with
        # purge_step: TensorBoard hides the events an interrupted run wrote after the checkpoint's step (the
        # checkpoint's own step was logged before it was saved, so it stays).
        self.writer = MetricsWriter(
            Path(cfg.output_dir) / "tensorboard",
            enabled=dist.is_main,
            tensorboard=cfg.tensorboard,
            total_steps=cfg.total_steps,
            purge_step=self.step + 1 if self.step else None,
        )
        self._iter = iter(self.data)
        if rng_state is not None:
            # Restored after iter(): a DataLoader draws its workers' base seed from the torch RNG there.
            restore_rng(rng_state)
        if dist.is_main:
            self._write_run_config()

    # ----- setup -----
    def _resume(self) -> dict | None:
        """Load the checkpoint to resume from, if any; returns this rank's RNG states to restore last."""
        tag_dir = self.resume_dir
        if tag_dir is None:
            return None
        rank_state, run_state = self.ckpt.load(self.engine, tag_dir)
        self.step = self.last_saved = int(run_state["step"])
        # The best as known at the resumed step; best.json follows it (a crash may have left it behind).
        self.best.restore(run_state.get("best"), self.ckpt.root)
        if self.dist.is_main:
            write_best(self.ckpt.root, self.best.record)
        if rank_state is not None:
            self.skipped_steps = rank_state.get("skipped_steps", 0)
            self.nonfinite_in_row = rank_state.get("nonfinite_in_row", 0)
            if rank_state.get("data") is not None:  # its counters included
                self.data.load_state_dict(rank_state["data"])
        elif self.step:
            # Another world size: per-rank data states cannot be mapped. The source continues at the position
            # (e.g. on re-seeded streams) instead of replaying its first batches.
            self.data.start_at(self.step * self.gas)
        if self.dist.is_main:
            log.info("resumed from %s at step %d", tag_dir, self.step)
        return rank_state["rng"] if rank_state is not None else None

    def _build_ema(self) -> WeightEma | None:
        """The EMA of the weights (``ema_decay`` > 0, engine/ema.py): the resumed checkpoint's, else started
        from the current weights (a checkpoint saved without one: with a warning)."""
        if not self.cfg.ema_decay:
            return None
        cfg, dist = self.cfg, self.dist
        ema = WeightEma(self.engine.module, cfg.ema_decay, dist.rank, dist.world_size, self.engine.optimizer)
        if self.resume_dir is not None:
            record = read_marker(self.resume_dir).get("ema")
            if record:
                ema.load(self.resume_dir, record)
            elif self.dist.is_main:
                log.warning("checkpoint %s holds no EMA of the weights (saved with ema_decay = 0): the EMA "
                            "starts from its weights", self.resume_dir)  # fmt: skip
        if self.dist.is_main:
            log.info("EMA of the weights, decay %s: %.1f MiB fp32 on rank 0 (%d updates so far)", ema.decay,
                     ema.local_elements * 4 / 2**20, ema.updates)  # fmt: skip
        return ema

    def _trainer_settings(self) -> dict:
        """The trainer config as recorded: every field but ``run_info`` (config.json has it at the top)."""
        return {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "run_info"}

    def _write_run_config(self) -> None:
        """``config.json``: the program's ``run_info`` at the top level (recipe, command, resolved model
        config) and, under ``engine``, what the engine ran with; each recorded once (docs/engine.md)."""
        import deepspeed

        engine_info = {
            "trainer": self._trainer_settings(),
            "ds_config": self.ds_config,
            "world_size": self.dist.world_size,
            "precision": precision_of(self.ds_config),
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__},
        }
        config = {**self.cfg.run_info, "engine": engine_info}
        Path(self.cfg.output_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(
            Path(self.cfg.output_dir) / "config.json", json.dumps(config, indent=1, default=str).encode()
        )

    # ----- signals -----
    def _on_signal(self, signum, frame) -> None:
        # Only a flag, so a signal during a collective, during a save or a second time is harmless; acted on
        # at the next step boundary, agreed across ranks in the step's flag all-reduce.
        self._stop_signal = self._stop_signal or signum

    def _install_signals(self) -> dict:
        if not self.cfg.handle_signals:
            return {}
        try:
            previous = {sig: signal.signal(sig, self._on_signal) for sig in PREEMPT_SIGNALS}
        except ValueError:  # not the main thread: the caller owns signals
            return {}
        for sig in PREEMPT_SIGNALS:  # restart interrupted system calls (socket and file I/O), never EINTR
            signal.siginterrupt(sig, False)
        # A signal that arrived while the job was being set up (caught by supervise.register_rank).
        self._stop_signal = self._stop_signal or pending_signal()
        return previous

    def _start_watchdog(self) -> Watchdog:
        self._watchdog = Watchdog(
            self.cfg.output_dir,
            self.dist.rank,
            self.dist.world_size,
            fixed_s=limit_from_env(self.cfg.watchdog_s),
            floor_s=self.cfg.watchdog_floor_s,
            factor=self.cfg.watchdog_factor,
        )
        return self._watchdog.start(self.step)

    # ----- the loop -----
    def fit(self) -> TrainResult:
        """Train until total_steps, a preemption signal, or too many non-finite losses in a row."""
        previous = self._install_signals()
        watchdog = self._start_watchdog()
        try:
            try:
                result = self._loop()
            finally:
                self.writer.close()
                close_data(self.data)  # its loader workers (persistent ones outlive an iteration)
            if self.cfg.shutdown_at_end:
                shutdown_distributed()
            elif torch_dist.is_initialized():
                torch_dist.barrier()
        finally:
            watchdog.stop()
            # After the last barrier: a late or repeated signal (a launcher tearing down) cannot kill a rank
            # that has saved but not yet returned its exit code.
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return result

    def _set_lr(self) -> float:
        lr = lr_at(
            self.step,
            self.cfg.lr,
            self.cfg.warmup_steps,
            self.cfg.total_steps,
            self.cfg.min_lr,
            self.cfg.schedule,
        )
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def _next_batch(self) -> Any:
        try:
            return next(self._iter)
        except StopIteration:  # a finite dataset: start its next epoch
            self._iter = iter(self.data)
            return next(self._iter)

    def _train_step(self, window_stats: dict, log_step: bool) -> tuple[MetricAccumulator, bool, bool, bool]:
        """One optimizer step over ``gas`` micro-batches: its metrics and non-finite/skipped/stop flags.

        A non-finite loss on any rank skips the optimizer step on every rank (StepGuard); an fp16 overflow
        is skipped by DeepSpeed's loss scaler and counted as skipped too.
        """
        device = self.dist.device
        step_metrics = MetricAccumulator(device)
        nonfinite = torch.zeros((), device=device)
        for micro in range(self.gas):
            waited = time.perf_counter()
            batch = self._next_batch()  # the time the step waits on the loader: perf/data_wait_pct
            window_stats["data_wait_s"] = window_stats.get("data_wait_s", 0.0) + time.perf_counter() - waited
            for key, value in self.task.batch_stats(batch).items():
                window_stats[key] = window_stats.get(key, 0.0) + float(value)
            batch = self.task.prepare_batch(batch, device)
            loss, metrics = self.engine(batch)
            nonfinite = nonfinite + (~torch.isfinite(loss.detach().float())).float()
            step_metrics.add({**metrics, "loss/total": loss})
            self.engine.backward(loss)
            if micro == self.gas - 1:
                # The one host sync of the step: agree on skip and stop before the optimizer runs.
                flags = torch.stack([nonfinite, torch.full((), float(self._stop_signal != 0), device=device)])
                if self.dist.world_size > 1:
                    torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX)
                skip, stop = (bool(v > 0) for v in flags.tolist())
                self.guard.skip = skip
                if log_step and self._own_grad_norm:
                    self._grad_norm = _module_grad_norm(self.engine.module)
            overflow_before = self.engine.skipped_steps
            try:
                self.engine.step()
            finally:
                self.guard.skip = False
        skipped = skip or self.engine.skipped_steps > overflow_before
        if self.ema is not None and not skipped:  # a step that ran: the weights moved
            self.ema.update()
        return step_metrics, skip, skipped, stop

    def _loop(self) -> TrainResult:
        self.engine.train()
        window, stats = MetricAccumulator(self.dist.device), {}
        window_start, excluded, steps_in_window, last_metrics = time.perf_counter(), 0.0, 0, {}
        while self.step < self.cfg.total_steps:
            lr = self._set_lr()
            log_step = (self.step + 1) % self.cfg.log_every == 0 or self.step + 1 == self.cfg.total_steps
            self._watchdog.step_begins()
            step_metrics, nonfinite, skipped, stop = self._train_step(stats, log_step)
            self.step += 1
            self._watchdog.progress(self.step)
            steps_in_window += 1
            self.skipped_steps += skipped
            self.nonfinite_in_row = self.nonfinite_in_row + 1 if nonfinite else 0
            if not nonfinite:
                window.merge(step_metrics)
            too_many_nonfinite = self.nonfinite_in_row >= self.cfg.max_nonfinite_in_row
            if log_step or stop:
                elapsed = time.perf_counter() - window_start - excluded
                last_metrics = self._log(window, stats, lr, elapsed, steps_in_window)
                window, stats = MetricAccumulator(self.dist.device), {}
                window_start, excluded, steps_in_window = time.perf_counter(), 0.0, 0
            if too_many_nonfinite:
                self.save()
                log.error(
                    "stopping: %d non-finite losses in a row (last step %d); the checkpoint holds the "
                    "parameters before them. Lower the LR or inspect the data, then resume.",
                    self.nonfinite_in_row,
                    self.step,
                )
                return TrainResult(self.step, "nonfinite", last_metrics)
            if stop and self.step < self.cfg.total_steps:  # preempted on the last step: just finish
                self.save()
                if self.dist.is_main:
                    log.warning(
                        "preemption signal: saved step %d, exiting with %d", self.step, EXIT_PREEMPTED
                    )
                return TrainResult(self.step, "preempted", last_metrics)
            excluded += self._maybe_eval()  # after the stop checks: a preempted job has no time for it
            if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                excluded += self.save()
        self.save()
        return TrainResult(self.step, "finished", last_metrics)

    def _maybe_eval(self) -> float:
        every = self.cfg.eval_every
        if self.eval_fn is None or not every or (self.step % every and self.step != self.cfg.total_steps):
            return 0.0
        start = time.perf_counter()
        self.engine.eval()
        with torch.no_grad():
            scalars = dict(self.eval_fn(self.step))
            if self.ema is not None:  # the same evaluation on the EMA weights, its scalars as ema/<name>
                with self.ema.swapped():
                    scalars.update({f"{EMA_PREFIX}{k}": v for k, v in self.eval_fn(self.step).items()})
        self.engine.train()
        self.writer.write(self.step, scalars)
        if self.best.offer(scalars, self.step, self.dist.world_size):
            self.save()  # this step's checkpoint; its marker records the new best
            if self.dist.is_main:
                write_best(self.ckpt.root, self.best.record)
                self.ckpt.prune()  # the best it replaces now rotates like any checkpoint
                record = self.best.record
                log.info("best %s %.6g at step %d: kept as %s", record["metric"], record["value"], self.step,
                         record["tag"])  # fmt: skip
        return time.perf_counter() - start

    def _log(self, window: MetricAccumulator, stats: dict, lr: float, elapsed: float, steps: int) -> dict:
        metric_names, counters = self._gather_names(window)
        extra = {
            f"perf/{k}": stats.get(k, 0.0)
            for k in ("samples", "tokens", "flops", "recompute_flops", "data_wait_s")
        }
        # A task that pads may say what its real tokens need (batch_stats "unpadded_flops"); else the same.
        extra["perf/unpadded_flops"] = stats.get("unpadded_flops", stats.get("flops", 0.0))
        values = counter_values(self.data)
        extra.update({f"data/{k}": values.get(k, 0.0) for k in counters})
        means, sums = window.reduce(metric_names, extra)
        elapsed = max(elapsed, 1e-9)
        scalars = dict(means)
        scalars["optim/lr"] = lr
        grad_norm = self._grad_norm if self._own_grad_norm else self.engine.get_global_grad_norm()
        scalars["optim/grad_norm"] = _as_float(grad_norm)
        scalars["optim/loss_scale"] = _as_float(getattr(self.engine.optimizer, "cur_scale", 1.0))
        scalars["optim/skipped_steps"] = float(self.skipped_steps)
        scalars["perf/samples_per_sec"] = sums["perf/samples"] / elapsed
        scalars["perf/tokens_per_sec"] = sums["perf/tokens"] / elapsed
        scalars["perf/step_time_s"] = elapsed / max(steps, 1)
        # The share of the window's step time spent waiting for the next batch, averaged over the ranks: a
        # loader that cannot keep up shows here long before throughput is understood to be low.
        scalars["perf/data_wait_pct"] = 100.0 * sums["perf/data_wait_s"] / elapsed / self.dist.world_size
        if self.peak_flops:
            peak = self.peak_flops * self.dist.world_size
            scalars["perf/mfu_pct"] = 100.0 * sums["perf/flops"] / elapsed / peak
            scalars["perf/mfu_unpadded_pct"] = 100.0 * sums["perf/unpadded_flops"] / elapsed / peak
            # Hardware FLOPs: the model's plus what activation checkpointing recomputes (batch_stats
            # "recompute_flops"; 0 for a task that does not say): equal to the MFU without checkpointing.
            hardware = sums["perf/flops"] + sums["perf/recompute_flops"]
            scalars["perf/hfu_pct"] = 100.0 * hardware / elapsed / peak
        if self.dist.device.type == "cuda":
            scalars["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        scalars.update({k: v for k, v in sums.items() if k.startswith("data/")})
        self.writer.write(self.step, scalars)
        return scalars

    def _gather_names(self, window: MetricAccumulator) -> tuple[list[str], list[str]]:
        """Unions over ranks of the metric and data-counter names seen (one small all_gather_object per
        log step), so that the flat all-reduce has the same layout everywhere and can never mismatch."""
        names = (sorted(window.sums), sorted(self.data.counter_names))
        if self.dist.world_size == 1:
            return names
        gathered: list = [None] * self.dist.world_size
        torch_dist.all_gather_object(gathered, names)
        return tuple(sorted({n for rank_names in gathered for n in rank_names[k]}) for k in (0, 1))

    # ----- checkpoints -----
    def save(self) -> float:
        """Checkpoint the current step on all ranks (unless already saved); returns its seconds."""
        if self.last_saved == self.step:
            return 0.0
        start = time.perf_counter()
        rank_state = {
            "data": self.data.state_dict(),
            "rng": capture_rng(),
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_row": self.nonfinite_in_row,
            "data_counters": counter_values(self.data),  # a record: the data state restores them
        }
        # The marker: what a resume needs (the DeepSpeed config: its global batch, reshard.py) and the trainer
        # settings this checkpoint was trained with; the recipe stays in config.json only.
        # And the best evaluated checkpoint as known at this step (engine/best.py), which a resume restores.
        run_state = {
            "ds_config": self.ds_config,
            "trainer": self._trainer_settings(),
            "best": self.best.record,
        }
        rank_files = {}
        if self.ema is not None:  # each rank's share of the EMA (engine/ema.py), recorded in the marker
            run_state["ema"] = self.ema.record()
            rank_files[EMA_FILE_STEM] = self.ema.state_dict()
        self.ckpt.save(self.engine, self.step, rank_state, run_state, rank_files)
        self.last_saved = self.step
        return time.perf_counter() - start


def _module_grad_norm(module: torch.nn.Module) -> torch.Tensor | None:
    """The 2-norm of all gradients (already all-reduced at the accumulation boundary), left on the device."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


def _as_float(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value.item() if torch.is_tensor(value) else value)
