"""Per-GPU memory of the giant under ZeRO-3 at the paper's scale (256 GPUs, 24 samples per GPU).

Model states come from ZeRO-3's partitioning arithmetic applied to the real parameter count and the real
``ds_configs/zero3_bf16.json`` (gathering/prefetch/bucket sizes); activations are measured: the bytes autograd
saves for backward in one forward of the giant's layers with the paper's per-GPU batch (8 images, 8 texts,
8 pairs), in bf16 weights as DeepSpeed's bf16 mode uses, at depth 1 and 2 (the difference is one layer),
with and without activation checkpointing. Allocator fragmentation and kernel workspaces are not in these
bytes: the table keeps a 15% margin for them. Writes bench/results/memory_at_scale.{md,json}.

    python bench/memory_at_scale.py [--device cuda] [--gpus 256] [--gpu-gib 40]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from train_step import build_parser as bench_parser  # bench/train_step.py, beside this file
from train_step import run as bench_run

from beit3.model import build_model, count_parameters

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]


def activation_per_layer(device: str, ckpt: str, batch: tuple[int, int, int], text_len: int, pair_len: int):
    """(bytes for a depth-1 model, bytes per extra layer) of saved activations for the whole micro-batch."""
    out = []
    for depth in (1, 2):
        args = bench_parser().parse_args(
            [
                "--model",
                "beit3_giant_patch14_224",
                "--depth",
                str(depth),
                "--vl-layers",
                "0",
                "--images",
                str(batch[0]),
                "--texts",
                str(batch[1]),
                "--pairs",
                str(batch[2]),
                "--text-len",
                str(text_len),
                "--pair-text-len",
                str(pair_len),
                "--precision",
                "bf16-pure",
                "--activation-only",
                "--device",
                device,
            ]
        )
        args.grad_ckpt = ckpt
        r = bench_run(args)
        samples = sum(batch)
        out.append(r["activation_gib_per_sample"] * samples * GIB)
    return out[0], out[1] - out[0]


def model_state_bytes(params: int, gpus: int, ds: dict) -> dict[str, float]:
    """ZeRO-3 bf16 model states per GPU (bytes): partitions plus the gathered working set."""
    z = ds["zero_optimization"]
    grad_bytes = 4 if ds.get("data_types", {}).get("grad_accum_dtype") == "fp32" else 2
    live = float(z.get("stage3_max_live_parameters", 1e9))
    prefetch = float(z.get("stage3_prefetch_bucket_size", 5e7))
    reduce_bucket = float(z.get("reduce_bucket_size", 5e8))
    return {
        "bf16 parameter partition": 2 * params / gpus,
        f"gradient partition ({'fp32' if grad_bytes == 4 else 'bf16'})": grad_bytes * params / gpus,
        "fp32 master + Adam moments (12 B/param)": 12 * params / gpus,
        "gathered parameters (max live, bf16)": 2 * min(live, params),
        "prefetch bucket (bf16)": 2 * prefetch,
        "reduce bucket (fp32 worst case)": 4 * reduce_bucket,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gpus", type=int, default=256)
    p.add_argument("--gpu-gib", type=float, default=40.0)
    p.add_argument("--ds-config", type=Path, default=ROOT / "ds_configs" / "zero3_bf16.json")
    p.add_argument("--text-len", type=int, default=64, help="text length (paper: up to 256; 64 typical)")
    p.add_argument("--pair-text-len", type=int, default=40)
    args = p.parse_args(argv)
    cfg_model = build_model("beit3_giant_patch14_224", device="meta")
    params = count_parameters(cfg_model)["total"]
    depth = cfg_model.cfg.depth
    ds = json.loads(args.ds_config.read_text())
    states = model_state_bytes(params, args.gpus, ds)
    batch = (8, 8, 8)
    rows, result = [], {"params": params, "gpus": args.gpus, "device_measured": args.device, "configs": {}}
    for ckpt in ("none", "all"):
        base, per_layer = activation_per_layer(args.device, ckpt, batch, args.text_len, args.pair_text_len)
        acts = base + per_layer * (depth - 1)
        total = sum(states.values()) + acts
        with_margin = total * 1.15
        result["configs"][ckpt] = {
            "activation_gib": acts / GIB,
            "per_layer_gib": per_layer / GIB,
            "model_states_gib": sum(states.values()) / GIB,
            "total_gib": total / GIB,
            "total_with_margin_gib": with_margin / GIB,
            "fits": with_margin <= args.gpu_gib * GIB,
        }
        rows.append((ckpt, acts, per_layer, total, with_margin))
    lines = [
        f"# Giant (paper layout, {params / 1e9:.2f}B parameters) under ZeRO-3 on {args.gpus} GPUs, "
        f"24 samples per GPU (8 images, 8 texts of {args.text_len} tokens, "
        f"8 pairs of 257+{args.pair_text_len})",
        "",
        f"Command: `python bench/memory_at_scale.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"activations measured on `{args.device}`, torch {torch.__version__}; DeepSpeed config "
        f"`{args.ds_config.relative_to(ROOT) if args.ds_config.is_relative_to(ROOT) else args.ds_config}`.",
        "",
        "| model state per GPU | GiB |",
        "|---|---|",
        *[f"| {k} | {v / GIB:.3f} |" for k, v in states.items()],
        f"| **sum** | **{sum(states.values()) / GIB:.3f}** |",
        "",
        "| activation checkpointing | activations GiB (per layer) | total GiB | total +15% GiB | fits "
        f"{args.gpu_gib:.0f} GiB |",
        "|---|---|---|---|---|",
        *[
            f"| {c} | {a / GIB:.2f} ({pl / GIB:.3f}) | {t / GIB:.2f} | {m / GIB:.2f} | "
            f"{'yes' if m <= args.gpu_gib * GIB else 'no'} |"
            for c, a, pl, t, m in rows
        ],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_at_scale.md").write_text(text)
    (out / "memory_at_scale.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
