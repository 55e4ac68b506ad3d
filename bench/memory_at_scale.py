"""Per-GPU memory of the giant under ZeRO-3 at the paper's scale (256 GPUs, 24 samples per GPU).

Model states come from the memory model of ``beit3.pretrain.plan`` (the one ``beit3-plan`` uses: ZeRO's
partitioning arithmetic applied to the real parameter count and the real ``ds_configs/zero3_bf16.json``,
gathering/prefetch/bucket sizes); activations are measured: the bytes autograd saves for backward in one
forward of the giant's layers with the paper's per-GPU batch (8 images, 8 texts, 8 pairs) at the giant
recipe's text lengths (``pretrain/recipes/giant.toml``: texts of 128, pair captions of 64), in bf16 weights
as DeepSpeed's bf16 mode uses, at depth 1 and 2 (the difference is one layer), without activation
checkpointing and with it (whole layers, attention branches only, FFN branches only); the planner's
per-token model of the same bytes (``estimate_activations``) is shown beside them. Allocator
fragmentation and kernel workspaces are not in these bytes: the table keeps the planner's 15% margin for
them. Writes bench/results/memory_at_scale.{md,json}.

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
from beit3.pretrain.objective import masked_positions
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
# (name, every layer checkpointed?, part): the table's rows; the names are beit3-plan's --checkpointing
# values, or the part recomputed in every layer.
CHECKPOINTING = (("none", 0, "layer"), ("all", 1, "layer"), ("attention", 1, "attention"), ("ffn", 1, "ffn"))
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
    argv += ["--exact-text-masks"]  # each row's masked count as the data pipeline draws it
    args = bench_parser().parse_args([*argv, "--device", device])
    args.grad_ckpt = ckpt
    r = bench_run(args)
    return r["activation_gib_per_sample"] * sum(batch) * GIB


def measured_activations(
    device: str, batch: tuple[int, int, int], text_len: int, pair_len: int, model: str = MODEL
) -> ActivationModel:
    """The :class:`ActivationModel` of a micro-batch, measured: depth 1 and 2 without checkpointing and
    with each part checkpointed (a layer is the difference; the rest of the depth-1 model is the base). A
    layer whose attention (FFN) branch is recomputed keeps its input and the other branch's bytes."""

    def per_layer(ckpt: str) -> tuple[float, float]:
        one, two = (saved_bytes(device, ckpt, n, batch, text_len, pair_len, model) for n in (1, 2))
        return one, two - one

    one, layer = per_layer("none")
    checkpointed = per_layer("all")[1]
    keeps_ffn, keeps_attention = per_layer("attention")[1], per_layer("ffn")[1]
    return ActivationModel(
        base=one - layer,
        layer=layer,
        checkpointed_layer=checkpointed,
        attention=keeps_attention - checkpointed,
        ffn=keeps_ffn - checkpointed,
    )


def modelled_activations(cfg, batch: tuple[int, int, int], text_len: int, pair_len: int) -> ActivationModel:
    """The planner's estimate for the same synthetic batch (the rows its heads see: the objective's
    fixed-size gathers of its masked positions, whose counts per row are the data pipeline's)."""
    b = synthetic_batch(cfg, *batch, text_len, pair_len, exact_text_masks=True)

    def rows(keys: tuple[str, ...], select: str) -> int:
        return sum(masked_positions(b[k][select])[0].numel() for k in keys if k in b)

    predicted_text = rows(("text", "pair"), "text_labels")
    predicted_patches = rows(("image", "pair"), "image_mask")
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
    for ckpt, layers, part in CHECKPOINTING:
        layers = layers and depth
        acts = activation_bytes(measured, depth, layers, part)
        model_acts = activation_bytes(modelled, depth, layers, part)
        per_layer = measured.per_layer(part) if layers else measured.layer
        total = sum(states.values()) + acts
        with_margin = total * MARGIN
        result["configs"][ckpt] = {
            "activation_gib": acts / GIB,
            "modelled_activation_gib": model_acts / GIB,
            "per_layer_gib": per_layer / GIB,
            "model_states_gib": sum(states.values()) / GIB,
            "total_gib": total / GIB,
            "total_with_margin_gib": with_margin / GIB,
            "fits": with_margin <= args.gpu_gib * GIB,
        }
        rows.append((ckpt, acts, model_acts, per_layer, total, with_margin))
    lines = [
        f"# Giant (paper layout, {params / 1e9:.2f}B parameters) under ZeRO-3 on {args.gpus} GPUs, "
        f"24 samples per GPU (8 images, 8 texts of {text_len} tokens, 8 pairs of 257+{pair_len})",
        "",
        f"Command: `python bench/memory_at_scale.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
        f"activations measured on `{args.device}`, torch {torch.__version__}; DeepSpeed config "
        f"`{result['ds_config']}`; text lengths of `{args.recipe.name}`. Model states and totals: "
        "`beit3.pretrain.plan` (`beit3-plan`'s memory model); with checkpointing the total holds the full "
        "activations of one recomputed part besides what the checkpointed layers keep (its recompute in the "
        "backward). `attention` / `ffn`: every layer recomputes its attention / FFN branch only and keeps "
        "the other branch's activations.",
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
