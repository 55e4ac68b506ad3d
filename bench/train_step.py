"""Training-step throughput, MFU/HFU and memory of any model config on one device.

Times the full pretraining step (image, text and pair sub-batches, masked-position heads, one backward, the
optimizer step) on synthetic batches with the paper's composition, in plain PyTorch on one device, so the
figure isolates the model's compute efficiency from communication (docs/performance.md). Prints a table
and writes JSON + Markdown under ``bench/results/``::

    python bench/train_step.py --model beit3_giant_patch14_224 --depth 8 --images 8 --texts 8 --pairs 8 \\
        --precision bf16 --grad-ckpt all --device cuda --name giant_h100

``--objective one-pass three-pass`` times the shipped objective (one pass per micro-batch) beside the
three-pass reference (``bench/three_pass.py``) with the same weights and batch, steps interleaved.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from synthetic import synthetic_batch  # bench/synthetic.py, beside this file
from three_pass import ThreePassObjective  # bench/three_pass.py

from beit3.engine.metrics import device_peak_flops
from beit3.model import build_model, count_parameters
from beit3.pretrain.objective import MaskedDataModeling

OBJECTIVES = {"one-pass": MaskedDataModeling, "three-pass": ThreePassObjective}


def saved_activation_bytes(task: MaskedDataModeling, batch: dict) -> int:
    """Bytes of tensors autograd saves for backward in one forward (activation memory, no allocator slack)."""
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in task.parameters()}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:  # weights are model state, not activations
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = task(batch)
    del loss
    return sum(seen.values())


def _setup(args: argparse.Namespace, objective: str):
    """The task (fresh model, same seed: same weights for every objective), optimizer, batch and step."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    overrides = {"drop_path_rate": 0.0}
    if args.depth:
        overrides["depth"] = args.depth
        overrides["vl_expert_layers"] = 0 if args.layout_released else min(args.vl_layers, args.depth)
    model = build_model(args.model, **overrides).to(device)
    if args.grad_ckpt != "none":  # every layer: whole ("all"), or its attention or FFN branch only
        model.set_grad_checkpointing(True, part="layer" if args.grad_ckpt == "all" else args.grad_ckpt)
    if args.compile:  # every layer's packed path, as [model] compile = "layers" in training
        model.compile_layers(args.compile_backend)
    task = OBJECTIVES[objective](model).to(device)
    if args.precision == "bf16-pure":  # like DeepSpeed's bf16 mode: bf16 weights, no autocast casts
        task.to(torch.bfloat16)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(task.param_groups(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=fused)
    cpu_batch = synthetic_batch(
        model.cfg,
        args.images,
        args.texts,
        args.pairs,
        args.text_len,
        args.pair_text_len,
        exact_text_masks=args.exact_text_masks,
    )
    stats = task.batch_stats(cpu_batch)
    batch = task.prepare_batch(cpu_batch, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step() -> float:
        """One training step; returns the seconds of its forward+backward (synchronised)."""
        t0 = time.perf_counter()
        with amp:
            loss, _ = task(batch)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        fwd_bwd = time.perf_counter() - t0
        opt.step()
        opt.zero_grad(set_to_none=True)
        return fwd_bwd

    return task, opt, batch, stats, amp, step


def run(args: argparse.Namespace) -> dict:
    """One configuration: ``args.objective`` (a name, or a list whose first name is taken)."""
    objective = args.objective if isinstance(args.objective, str) else args.objective[0]
    return run_side_by_side(args, [objective])[0]


def run_side_by_side(args: argparse.Namespace, objectives: list[str]) -> list[dict]:
    """One result per objective, their timed steps interleaved (step of the first, of the second, ...)."""
    device = torch.device(args.device)
    setups = [_setup(args, o) for o in objectives]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup if not args.activation_only else 0):
        for *_, step in setups:
            step()
    sync()
    times: list[list[float]] = [[] for _ in setups]
    fwd_bwd: list[list[float]] = [[] for _ in setups]  # the forward+backward part of each step
    cpu_times: list[list[float]] = [[] for _ in setups]  # process CPU time: less hurt by a shared machine
    peaks = [0.0 for _ in setups]
    for _ in range(args.steps if not args.activation_only else 0):
        for k, (*_, step) in enumerate(setups):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fwd_bwd[k].append(step())
            sync()
            times[k].append(time.perf_counter() - t0)
            cpu_times[k].append(time.process_time() - c0)
            if device.type == "cuda":
                peaks[k] = max(peaks[k], torch.cuda.max_memory_allocated(device) / 2**30)
    results = []
    for objective, (task, opt, batch, stats, amp, _), t, c, peak_mem, fb in zip(
        objectives, setups, times, cpu_times, peaks, fwd_bwd
    ):
        results.append(_result(args, objective, task, opt, batch, stats, amp, t, c, peak_mem, fb))
    return results


def _result(args, objective, task, opt, batch, stats, amp, times, cpu_times, peak_mem, fwd_bwd) -> dict:
    device = torch.device(args.device)
    model = task.model
    step_time = statistics.median(times) if times else float("nan")
    fwd_bwd_time = statistics.median(fwd_bwd) if fwd_bwd else float("nan")
    with amp:
        act_bytes = saved_activation_bytes(task, batch)
    opt.zero_grad(set_to_none=True)
    peak = device_peak_flops(device, args.peak_flops)
    hw_flops = stats["flops"] + stats.get("recompute_flops", 0.0)  # what checkpointing runs again
    samples = stats["samples"]
    result = {
        "model": args.model,
        "objective": objective,
        "depth": model.cfg.depth,
        "params_total": count_parameters(model)["total"],
        "batch": {
            "images": args.images,
            "texts": args.texts,
            "pairs": args.pairs,
            "text_len": args.text_len,
            "pair_text_len": args.pair_text_len,
        },
        "precision": args.precision,
        "grad_ckpt": args.grad_ckpt,
        "compile": args.compile,
        "step_time_s": step_time,
        "step_times_s": times,
        "step_cpu_s": statistics.median(cpu_times) if cpu_times else float("nan"),
        "samples_per_s": samples / step_time,
        "tokens_per_s": stats["tokens"] / step_time,
        "model_tflops_per_step": stats["flops"] / 1e12,
        "recompute_tflops_per_step": stats.get("recompute_flops", 0.0) / 1e12,
        "achieved_tflops": stats["flops"] / step_time / 1e12,
        "fwd_bwd_time_s": fwd_bwd_time,
        "optimizer_time_s": step_time - fwd_bwd_time,
        "mfu_pct": 100 * stats["flops"] / step_time / peak if peak else None,
        # the model's FLOPs are all in the forward+backward: its MFU without the optimizer step
        "fwd_bwd_mfu_pct": 100 * stats["flops"] / fwd_bwd_time / peak if peak else None,
        "hfu_pct": 100 * hw_flops / step_time / peak if peak else None,
        "activation_gib_per_sample": act_bytes / samples / 2**30,
        "peak_memory_gib": peak_mem if device.type == "cuda" else None,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join(["python bench/train_step.py", *sys.argv[1:]]),
    }
    return result


def format_table(results: list[dict]) -> str:
    cols = [
        "model",
        "objective",
        "depth",
        "precision",
        "grad_ckpt",
        "compile",
        "step_time_s",
        "fwd_bwd_time_s",
        "optimizer_time_s",
        "step_cpu_s",
        "samples_per_s",
        "tokens_per_s",
        "achieved_tflops",
        "mfu_pct",
        "fwd_bwd_mfu_pct",
        "hfu_pct",
        "activation_gib_per_sample",
        "peak_memory_gib",
    ]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v)))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def speedups(results: list[dict]) -> str:
    """Three-pass over one-pass median step time for each setting measured both ways ("" if none)."""
    lines = []
    for r in results:
        if r["objective"] != "one-pass":
            continue
        for o in results:
            if o["objective"] == "three-pass" and o["grad_ckpt"] == r["grad_ckpt"]:
                ratio = o["step_time_s"] / r["step_time_s"]
                cpu = o["step_cpu_s"] / r["step_cpu_s"]
                lines.append(
                    f"- grad_ckpt={r['grad_ckpt']}: three-pass / one-pass median step time = {ratio:.3f} "
                    f"(wall clock), {cpu:.3f} (process CPU time)"
                )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/train_step.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="beit3_tiny_patch16_64")
    p.add_argument("--depth", type=int, default=0, help="override the number of layers (0: the preset's)")
    p.add_argument(
        "--vl-layers", type=int, default=3, help="VL-expert layers when --depth is given (paper layout)"
    )
    p.add_argument(
        "--layout-released", action="store_true", help="the model is released-layout (no VL experts)"
    )
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--texts", type=int, default=8)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--pair-text-len", type=int, default=40)
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "bf16-pure"),
        default="bf16",
        help="bf16: autocast over fp32 weights; bf16-pure: bf16 weights (DeepSpeed's bf16 mode)",
    )
    p.add_argument(
        "--grad-ckpt",
        choices=("none", "all", "attention", "ffn"),
        nargs="+",
        default=["none"],
        help="activation checkpointing of every layer: all of it, or its attention or FFN branch only",
    )
    p.add_argument(
        "--objective",
        choices=tuple(OBJECTIVES),
        nargs="+",
        default=["one-pass"],
        help="one-pass: the shipped objective; three-pass: one forward per sub-batch (bench/three_pass.py); "
        "several: timed side by side, steps interleaved",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile every layer (BEiT3Model.compile_layers)"
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--activation-only", action="store_true", help="measure activation memory only, no timing")
    p.add_argument(
        "--exact-text-masks",
        action="store_true",
        help="mask round(ratio x length) text positions per row, as the data pipeline does",
    )
    p.add_argument("--peak-flops", type=float, default=None, help="override the device's peak FLOP/s")
    p.add_argument("--name", default=None, help="results file stem under --results-dir")
    p.add_argument("--results-dir", type=Path, default=Path("bench/results"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = []
    for ckpt in args.grad_ckpt:
        one = argparse.Namespace(**{**vars(args), "grad_ckpt": ckpt})
        results.extend(run_side_by_side(one, list(dict.fromkeys(args.objective))))
    table = format_table(results)
    ratios = speedups(results)
    print(table)
    if ratios:
        print(ratios)
    if args.name:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / f"{args.name}.json").write_text(json.dumps(results, indent=2))
        r = results[0]
        (args.results_dir / f"{args.name}.md").write_text(
            f"# bench/train_step.py: {args.name}\n\nCommand: `{r['command']}`\n\n"
            f"Device: {r['device']}, {r['threads']} threads, torch {r['torch']}\n\n{table}\n"
            + (f"\n{ratios}\n" if ratios else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
