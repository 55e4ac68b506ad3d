"""Forward+backward time of our Multiway Transformer vs the reference (torchscale 0.3.0 ``BEiT3``).

Both models get the same configuration and the same weights (the reference's, copied into ours), and each
measured step runs ours and the reference back to back in alternating order, so that load on the shared
machine affects both alike. Prints a table and writes ``bench/results/model_vs_reference.md``.

Needs the reference installed (``bash scripts/install.sh --tests``). Example::

    python bench/model_vs_reference.py --steps 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the reference helpers live with the tests that use them

from reference_impl import (  # noqa: E402
    build_reference,
    copy_reference_into,
    randomize_,
    reference_forward,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/report.py, beside this file
from report import environment_lines, interleaved_timing, timing_cells  # noqa: E402

from beit3.model import BEiT3Model, get_config  # noqa: E402

MODES = ("fused", "vision", "text")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="measured steps per mode (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "model_vs_reference.md"))
    p.add_argument("--note", default="", help="free text written under the table (e.g. 'before fix')")
    args = p.parse_args(argv)
    bad = sorted(set(args.modes.split(",")) - set(MODES))
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {MODES}")
    return args


def make_inputs(args: argparse.Namespace, vocab: int, mode: str) -> dict[str, torch.Tensor]:
    """Seeded random images and texts; a quarter of each text's tail is padding in one half of the batch."""
    gen = torch.Generator().manual_seed(0)
    inputs: dict[str, torch.Tensor] = {}
    if mode in ("fused", "vision"):
        inputs["image"] = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen)
    if mode in ("fused", "text"):
        inputs["text"] = torch.randint(0, vocab, (args.batch, args.text_len), generator=gen)
        pad = torch.zeros(args.batch, args.text_len, dtype=torch.bool)
        pad[: args.batch // 2, args.text_len * 3 // 4 :] = True
        inputs["text_padding_mask"] = pad
    return inputs


def step(run, model: torch.nn.Module, inputs: dict) -> tuple[float, float]:
    """Wall-clock and process CPU seconds for one forward + backward of a scalar loss over all outputs.

    On a machine shared with other jobs CPU time is the steadier measure: time spent preempted does not
    count. With ``--threads 1`` it is the compute time of the step.
    """
    model.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    out = run(model, **inputs)
    out.float().square().mean().backward()
    return time.perf_counter() - t0, time.process_time() - c0


def bench_mode(args: argparse.Namespace, ours: BEiT3Model, ref: torch.nn.Module, mode: str) -> dict:
    """Median step times (wall and CPU) of both models in one mode, measured interleaved."""
    inputs = make_inputs(args, ours.cfg.vocab_size, mode)
    with torch.no_grad():
        a, b = ours(**inputs), reference_forward(ref, **inputs)
        rel_err = ((a - b).norm() / b.norm()).item()

    def run_ours(m, **kw):
        return m(**kw)

    timing = interleaved_timing(
        lambda: step(run_ours, ours, inputs),
        lambda: step(reference_forward, ref, inputs),
        args.warmup,
        args.steps,
    )
    return {"mode": mode, "rel_err": rel_err, **timing}


def render(args: argparse.Namespace, rows: list[dict], argv: list[str]) -> str:
    """The results as a markdown document with device, versions and the command."""
    lines = [
        "# Ours vs reference (torchscale 0.3.0 BEiT3): forward + backward on CPU",
        "",
        f"Config: {args.layers} layers, hidden {args.dim}, {args.heads} heads, FFN {4 * args.dim}, "
        f"image {args.img_size}px / patch 16, batch {args.batch}, text length {args.text_len} "
        f"(half the batch padded by 25%), fp32, train mode; median of {args.steps} steps after "
        f"{args.warmup} warm-up steps, ours and the reference alternating each step; wall-clock and "
        "process CPU time of the same steps.",
        "",
        "| mode | tokens/sample | wall: ours (ms) | wall: reference (ms) | wall: reference / ours "
        "| CPU: ours (ms) | CPU: reference (ms) | CPU: reference / ours | output rel. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    nv = (args.img_size // 16) ** 2 + 1
    for r in rows:
        tokens = {"fused": nv + args.text_len, "vision": nv, "text": args.text_len}[r["mode"]]
        cells = [r["mode"], str(tokens), *timing_cells(r)]
        lines.append("| " + " | ".join([*cells, f"{r['rel_err']:.1e}"]) + " |")
    lines += [
        "",
        *environment_lines("bench/model_vs_reference.py", argv),
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
    cfg = get_config(
        "beit3_base_patch16_224",
        embed_dim=args.dim,
        depth=args.layers,
        num_heads=args.heads,
        ffn_dim=4 * args.dim,
        img_size=args.img_size,
        pretraining_heads=False,
    )
    ref = build_reference(cfg).train()
    randomize_(ref, seed=0)
    ours = BEiT3Model(cfg).train()
    copy_reference_into(ours, ref)
    rows = [bench_mode(args, ours, ref, mode) for mode in args.modes.split(",")]
    text = render(args, rows, argv)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
