"""The capacity planner's table for the giant recipe (docs/performance.md, "Capacity planner"), regenerated.

Runs ``beit3.pretrain.plan.plan`` (what ``beit3-plan`` prints) for the clusters, DeepSpeed configs,
checkpointing choices and micro-batch sizes the docs compare, at 45% MFU, and writes the table with the
command and versions to ``bench/results/<name>.{md,json}``::

    python bench/plan_table.py
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_results  # noqa: E402  (bench/report.py, beside this file)

# (gpu, gpus, gbps, ds config, checkpointing, part, passes, micro-batch or None for the recipe's)
ROWS = [
    *(
        ("A100-40GB", 256, gbps, ds, ckpt, "layer", 1, None)
        for gbps in (200, 400, 800)
        for ckpt in ("all", "none")
        for ds in ("zero3_bf16_hpz.json", "zero3_bf16.json")
    ),
    ("A100-40GB", 256, 400, "zero3_bf16_hpz.json", "all", "attention", 1, None),
    ("A100-40GB", 256, 400, "zero3_bf16_hpz.json", "all", "ffn", 1, None),
    ("A100-40GB", 256, 400, "zero2_bf16.json", "none", "layer", 1, None),
    ("A100-40GB", 256, 400, "zero3_bf16_hpz.json", "none", "layer", 3, None),
    ("A100-40GB", 256, 400, "zero3_bf16.json", "none", "layer", 3, None),
    *(
        ("H100-80GB", gpus, gbps, ds, "none", "layer", 1, None)
        for gpus in (64, 128)
        for gbps in (400, 3200)
        for ds in ("zero3_bf16_hpz.json", "zero3_bf16.json")
    ),
    ("H100-80GB", 64, 400, "zero3_bf16_hpz.json", "none", "layer", 1, 96),
    ("H100-80GB", 128, 400, "zero3_bf16_hpz.json", "none", "layer", 1, 48),
]


def run(rows=ROWS, mfu: float = 0.45) -> list[dict]:
    from beit3.pretrain.plan import plan

    out = []
    for gpu, gpus, gbps, ds, ckpt, part, passes, micro in rows:
        p = plan(
            recipe_path=str(ROOT / "pretrain/recipes/giant.toml"),
            gpu=gpu,
            gpus=gpus,
            gpus_per_node=8,
            gbps=gbps,
            ds_config=str(ROOT / "ds_configs" / ds),
            checkpointing=ckpt,
            checkpointing_part=part,
            mfu=mfu,
            passes=passes,
            micro_batch=micro,
        )
        out.append(
            {
                "gpu": gpu,
                "gpus": gpus,
                "gbps": gbps,
                "ds_config": ds,
                "checkpointing": ckpt if ckpt == "none" or part == "layer" else f"{ckpt}, {part}",
                "passes": passes,
                "micro_batches": p.micro_batches,
                "micro_batch": sum(p.micro_batch.values()),
                "gib": p.memory * 1.15 / 2**30,
                "fits": p.fits,
                "compute_s": p.compute_s,
                "comm_s": p.comm_s,
                "node_gb": p.inter_node_bytes / 1e9,
                "step_s": p.step_s,
                "mfu_pct": 100 * p.step_mfu,
                "days": p.days,
            }
        )
    return out


def format_table(rows: list[dict]) -> str:
    lines = [
        "| GPUs | Gb/s per node | DeepSpeed config | checkpointing | passes | micro-batches per step | "
        "GiB per GPU (+15%) | compute s | communication s (GB through each node's NICs) | step s | MFU | "
        "days for 1M steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['gpus']} x {r['gpu']} | {r['gbps']} | `{r['ds_config']}` | {r['checkpointing']} | "
            f"{r['passes']} | {r['micro_batches']} x {r['micro_batch']} | {r['gib']:.1f} | "
            f"{r['compute_s']:.3f} | {r['comm_s']:.3f} ({r['node_gb']:.1f} GB) | {r['step_s']:.3f} | "
            f"{r['mfu_pct']:.0f}% | "
            f"**{r['days']:.2f}** |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mfu", type=float, default=0.45)
    p.add_argument("--name", default="plan_table")
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    import torch

    rows = run(mfu=args.mfu)
    table = format_table(rows)
    command = " ".join(["python bench/plan_table.py", *(sys.argv[1:] if argv is None else argv)])
    text = (
        f"# bench/plan_table.py: {args.name}\n\nCommand: `{command}`\n\nModel projection (`beit3-plan`), no "
        f"device: python {platform.python_version()}, torch {torch.__version__}; the giant recipe "
        f"(`pretrain/recipes/giant.toml`, 1M steps of 6144 samples) at {100 * args.mfu:.0f}% MFU, 8 GPUs per "
        "node.\n\n" + table + "\n"
    )
    write_results(args.results_dir, args.name, text, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
