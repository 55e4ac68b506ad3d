"""Per-GPU memory of the giant under ZeRO-3 at the paper's scale (256 GPUs, 24 samples per GPU).

Model states come from the memory model of ``beit3.pretrain.plan`` (the one ``beit3-plan`` uses: ZeRO's
partitioning arithmetic applied to the real parameter count and the real ``ds_configs/zero3_bf16.json``,
gathering/prefetch/bucket sizes); activations are measured: the bytes autograd saves for backward in one
forward of the giant's layers with the paper's per-GPU batch (8 images, 8 texts, 8 pairs) at the giant
recipe's text lengths (``pretrain/recipes/giant.toml``: texts of 128, pair captions of 64), in bf16 weights
as DeepSpeed's bf16 mode uses, at depth 1 and 2 (the difference is one layer), with and without activation
checkpointing; the planner's per-token model of the same bytes (``estimate_activations``) is shown beside
them. Allocator fragmentation and kernel workspaces are not in these bytes: the table keeps the planner's
15% margin for them. Writes bench/results/memory_at_scale.{md,json}.

    python bench/memory_at_scale.py [--device cuda] [--gpus 256] [--gpu-gib 40]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from synthetic import synthetic_batch  # bench/synthetic.py, beside this file
from train_step import build_parser as bench_parser  # bench/train_step.py, beside this file
from train_step import run as bench_run

from beit3.model import build_model, count_parameters
from beit3.pretrain.plan import (
    DEFAULT_RECIPE,
    MARGIN,
    ActivationModel,
    activation_bytes,
    estimate_activations,
    model_state_bytes,
    persistent_parameters,
)
from beit3.pretrain.recipe import load_recipe

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]
MODEL = "beit3_giant_patch14_224"


def saved_bytes(
    device: str,
    ckpt: str,
    depth: int,
    batch: tuple[int, int, int],
    text_len: int,
    pair_len: int,
    model: str = MODEL,
) -> float:
    """Saved-activation bytes of one forward of ``model`` cut to ``depth`` layers (no VL experts)."""
    argv = ["--model", model, "--depth", str(depth), "--vl-layers", "0", "--images", str(batch[0])]
    argv += ["--texts", str(batch[1]), "--pairs", str(batch[2]), "--text-len", str(text_len)]
    argv += ["--pair-text-len", str(pair_len), "--precision", "bf16-pure", "--activation-only"]
    args = bench_parser().parse_args([*argv, "--device", device])
    args.grad_ckpt = ckpt
    r = bench_run(args)
    return r["activation_gib_per_sample"] * sum(batch) * GIB


def measured_activations(
    device: str, batch: tuple[int, int, int], text_len: int, pair_len: int, model: str = MODEL
) -> ActivationModel:
    """The :class:`ActivationModel` of a micro-batch, measured: depth 1 and 2 with and without
    checkpointing (a layer is the difference; the rest of the depth-1 model is the base)."""
    one, two = (saved_bytes(device, "none", n, batch, text_len, pair_len, model) for n in (1, 2))
    one_ck, two_ck = (saved_bytes(device, "all", n, batch, text_len, pair_len, model) for n in (1, 2))
    return ActivationModel(base=one - (two - one), layer=two - one, checkpointed_layer=two_ck - one_ck)


def modelled_activations(cfg, batch: tuple[int, int, int], text_len: int, pair_len: int) -> ActivationModel:
    """The planner's estimate for the same synthetic batch (its masked-position counts)."""
    b = synthetic_batch(cfg, *batch, text_len, pair_len)
    predicted_text = sum(int(b[k]["text_labels"].ne(-100).sum()) for k in ("text", "pair") if k in b)
    predicted_patches = sum(int(b[k]["image_mask"].sum()) for k in ("image", "pair") if k in b)
    return estimate_activations(cfg, *batch, text_len, pair_len, predicted_text, predicted_patches)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gpus", type=int, default=256)
    p.add_argument("--gpu-gib", type=float, default=40.0)
    p.add_argument("--ds-config", type=Path, default=ROOT / "ds_configs" / "zero3_bf16.json")
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, help="text lengths from here")
    p.add_argument("--text-len", type=int, default=None, help="default: the recipe's text_max_len")
    p.add_argument("--pair-text-len", type=int, default=None, help="default: the recipe's pair_text_max_len")
    args = p.parse_args(argv)
    data = load_recipe(args.recipe).data
    text_len = args.text_len or data.text_max_len
    pair_len = args.pair_text_len or data.pair_text_max_len
    cfg_model = build_model(MODEL, device="meta")
    params = count_parameters(cfg_model)["total"]
    depth = cfg_model.cfg.depth
    ds = json.loads(args.ds_config.read_text())
    persistent = persistent_parameters(cfg_model, ds)
    states = model_state_bytes(params, args.gpus, ds, persistent)
    batch = (8, 8, 8)
    measured = measured_activations(args.device, batch, text_len, pair_len)
    modelled = modelled_activations(cfg_model.cfg, batch, text_len, pair_len)
    result = {
        "params": params,
        "persistent_params": persistent,
        "gpus": args.gpus,
        "device_measured": args.device,
        "batch": dict(zip(("images", "texts", "pairs"), batch)),
        "text_len": text_len,
        "pair_text_len": pair_len,
        "ds_config": str(
            args.ds_config.relative_to(ROOT) if args.ds_config.is_relative_to(ROOT) else args.ds_config
        ),
        "activation_model": {"measured": asdict(measured), "modelled": asdict(modelled)},
        "configs": {},
    }
    rows = []
    for ckpt, layers in (("none", 0), ("all", depth)):
        acts = activation_bytes(measured, depth, layers)
        model_acts = activation_bytes(modelled, depth, layers)
        total = sum(states.values()) + acts
        with_margin = total * MARGIN
        result["configs"][ckpt] = {
            "activation_gib": acts / GIB,
            "modelled_activation_gib": model_acts / GIB,
            "per_layer_gib": (measured.checkpointed_layer if layers else measured.layer) / GIB,
            "model_states_gib": sum(states.values()) / GIB,
            "total_gib": total / GIB,
            "total_with_margin_gib": with_margin / GIB,
            "fits": with_margin <= args.gpu_gib * GIB,
        }
        per_layer = measured.checkpointed_layer if layers else measured.layer
        rows.append((ckpt, acts, model_acts, per_layer, total, with_margin))
    lines = [
        f"# Giant (paper layout, {params / 1e9:.2f}B parameters) under ZeRO-3 on {args.gpus} GPUs, "
        f"24 samples per GPU (8 images, 8 texts of {text_len} tokens, 8 pairs of 257+{pair_len})",
        "",
        f"Command: `python bench/memory_at_scale.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"activations measured on `{args.device}`, torch {torch.__version__}; DeepSpeed config "
        f"`{result['ds_config']}`; text lengths of `{args.recipe.name}`. Model states and totals: "
        "`beit3.pretrain.plan` (`beit3-plan`'s memory model); with checkpointing the total holds one layer's "
        "full activations besides the saved layer inputs (its recompute in the backward).",
        "",
        "| model state per GPU | GiB |",
        "|---|---|",
        *[f"| {k} | {v / GIB:.3f} |" for k, v in states.items()],
        f"| **sum** | **{sum(states.values()) / GIB:.3f}** |",
        "",
        "| activation checkpointing | activations GiB measured (per layer) | modelled (`beit3-plan`) | "
        f"total GiB | total +{MARGIN - 1:.0%} GiB | fits {args.gpu_gib:.0f} GiB |",
        "|---|---|---|---|---|---|",
        *[
            f"| {c} | {a / GIB:.2f} ({pl / GIB:.3f}) | {ma / GIB:.2f} | {t / GIB:.2f} | {m / GIB:.2f} | "
            f"{'yes' if m <= args.gpu_gib * GIB else 'no'} |"
            for c, a, ma, pl, t, m in rows
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
