"""Forward+backward time of the paper layout's shared attention: one fused q/k/v GEMM vs three projections.

The fused module is the model's own (``SelfAttention`` with ``decoupled=False``); the three-projection
module is a copy of it whose fused weight is taken apart into three ``nn.Linear`` modules with the same rows,
run through the same ``SelfAttention`` code (its three-projection path), so both compute the same function
(the output difference is reported). Two scopes: ``attention`` (the attention module alone on (B, T, D)
input) and ``model`` (a whole paper-layout model of ``--layers`` layers on image-text pairs). Each measured
step runs both variants back to back in alternating order, so that load on a shared machine affects both
alike; the median wall-clock and process CPU time are reported. Prints a table and writes
``bench/results/fused_qkv.md``. Example::

    python bench/fused_qkv.py --steps 20 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/report.py, beside this file
from report import environment_lines, interleaved_timing, timing_cells  # noqa: E402

from beit3.model import BEiT3Model, get_config
from beit3.model.layers import SelfAttention
from beit3.model.qkv import QKV_DISK_ORDER, QKV_PARTS

ROOT = Path(__file__).resolve().parents[1]
SCOPES = ("attention", "model")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--layers", type=int, default=2, help="layers of the model scope")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="measured steps per scope (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--scopes", default=",".join(SCOPES), help=f"comma-separated subset of {SCOPES}")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fused_qkv.md"))
    p.add_argument("--note", default="", help="free text written under the table")
    args = p.parse_args(argv)
    bad = sorted(set(args.scopes.split(",")) - set(SCOPES))
    if bad:
        p.error(f"unknown scope(s) {bad}; choose from {SCOPES}")
    return args


def three_projections(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose every fused q/k/v projection is three Linears holding its row blocks."""
    module = copy.deepcopy(module)
    for attn in module.modules():
        if not isinstance(attn, SelfAttention) or attn.qkv_proj is None:
            continue
        fused, d = attn.qkv_proj, attn.qkv_proj.dim
        parts = OrderedDict()
        for part in QKV_DISK_ORDER:
            i = QKV_PARTS.index(part)
            linear = nn.Linear(d, d)
            with torch.no_grad():
                linear.weight.copy_(fused.block(part))
                linear.bias.copy_(fused.bias[i * d : (i + 1) * d])
            parts[part] = linear
        del attn._modules["qkv_proj"]
        attn.qkv_proj = None  # SelfAttention's three-projection path
        for name, linear in parts.items():
            setattr(attn, name, linear)
    return module


def make_case(args: argparse.Namespace, scope: str):
    """(fused module, three-projection module, run(module) -> output) of one scope."""
    gen = torch.Generator().manual_seed(0)
    num_vision = (args.img_size // 16) ** 2 + 1
    if scope == "attention":
        fused = SelfAttention(args.dim, args.heads, decoupled=False, subln=True, eps=1e-5)
        x = torch.randn(args.batch, num_vision + args.text_len, args.dim, generator=gen)

        def run(m: nn.Module) -> torch.Tensor:
            return m(x, num_vision, None)

    else:
        cfg = get_config(
            "beit3_base_paper_patch16_224",
            embed_dim=args.dim,
            depth=args.layers,
            num_heads=args.heads,
            ffn_dim=4 * args.dim,
            img_size=args.img_size,
            patch_size=16,
            vl_expert_layers=min(1, args.layers),
            pretraining_heads=False,
            drop_path_rate=0.0,
        )
        fused = BEiT3Model(cfg)
        image = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen)
        text = torch.randint(3, 1000, (args.batch, args.text_len), generator=gen)

        def run(m: nn.Module) -> torch.Tensor:
            return m(image=image, text=text)

    fused.train()
    return fused, three_projections(fused).train(), run


def step(run, module: nn.Module) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one forward + backward of a scalar loss over the output."""
    module.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    run(module).square().mean().backward()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_scope(args: argparse.Namespace, scope: str) -> dict:
    fused, three, run = make_case(args, scope)
    with torch.no_grad():
        a, b = run(fused), run(three)
        max_diff = (a - b).abs().max().item()
    timing = interleaved_timing(lambda: step(run, fused), lambda: step(run, three), args.warmup, args.steps)
    return {"scope": scope, "max_diff": max_diff, **timing}


def render(args: argparse.Namespace, rows: list[dict], argv: list[str]) -> str:
    tokens = (args.img_size // 16) ** 2 + 1 + args.text_len
    lines = [
        "# Paper-layout shared attention: fused q/k/v GEMM vs three projections, forward + backward on CPU",
        "",
        f"Hidden {args.dim}, {args.heads} heads, batch {args.batch}, {tokens} tokens per sample (image "
        f"{args.img_size}px / patch 16 plus {args.text_len} text tokens), fp32, train mode. Scope "
        f"`attention`: the SelfAttention module (Sub-LN) alone; `model`: a paper-layout model of "
        f"{args.layers} layers (FFN {4 * args.dim}) on image-text pairs. Median of {args.steps} steps after "
        f"{args.warmup} warm-up steps, the two variants alternating each step; wall-clock and process CPU "
        "time of the same steps.",
        "",
        "| scope | wall: fused (ms) | wall: three (ms) | wall: three / fused | CPU: fused (ms) "
        "| CPU: three (ms) | CPU: three / fused | output max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["scope"], *timing_cells(r)]
        lines.append("| " + " | ".join([*cells, f"{r['max_diff']:.1e}"]) + " |")
    lines += [
        "",
        *environment_lines("bench/fused_qkv.py", argv),
    ]
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [bench_scope(args, scope) for scope in args.scopes.split(",")]
    text = render(args, rows, argv)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
