"""Loader headroom: per-GPU sample consumption of the giant vs what one loader worker produces.

Reads the measured per-worker throughput of each stream (``bench/loader_throughput.py --patch-size 14
--tokenizer-img-size 256``, i.e. the giant's two views) and compares it with how fast one GPU consumes samples
at a given step time: the paper's observed 1.21 s/step (1M steps in about two weeks on 256 A100), and the step
time implied by a target MFU on A100 and H100 (model FLOPs of the paper's per-GPU batch from
``beit3.model.flops``). Prints the workers (= CPU cores) needed per GPU and per 8-GPU node.

    python bench/loader_headroom.py [--throughput bench/results/loader_throughput_giant.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from beit3.engine.metrics import PEAK_FLOPS
from beit3.model import get_config
from beit3.model.flops import Pass, training_flops

ROOT = Path(__file__).resolve().parents[1]
NODE_CORES = {"A100": 128, "H100": 112}  # DGX A100 (2x64) and DGX H100 (2x56) CPU cores


def per_gpu_step_flops(text_len: int, caption_len: int, per_kind: int = 8) -> float:
    """Model FLOPs of one GPU's micro-batch of the paper's composition (8 images, 8 texts, 8 pairs)."""
    cfg = get_config("beit3_giant_patch14_224")
    passes = [Pass(per_kind, image=True), Pass(per_kind, text_len=text_len),
              Pass(per_kind, image=True, text_len=caption_len)]  # fmt: skip
    masked_text = int(0.15 * per_kind * text_len + 0.5 * per_kind / 2 * caption_len)
    masked_patches = int(0.4 * cfg.num_patches * per_kind * 1.5)
    return training_flops(cfg, passes, masked_text, masked_patches)


def mixed_rate(rates: dict[str, float], mix: dict[str, int]) -> float:
    """Samples/s of one worker producing the mix (time per sample averaged over the kinds)."""
    total = sum(mix.values())
    seconds_per_sample = sum(mix[k] / total / rates[k] for k in mix)
    return 1.0 / seconds_per_sample


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--throughput", type=Path, default=ROOT / "bench/results/loader_throughput_giant.json")
    p.add_argument("--text-len", type=int, default=128)
    p.add_argument("--caption-len", type=int, default=48)
    p.add_argument("--mfu", type=float, default=0.45)
    args = p.parse_args(argv)
    measured = json.loads(args.throughput.read_text())
    rates = measured["per_worker_samples_per_s"]
    worker = mixed_rate(rates, {"image": 1, "text": 1, "pair": 1})
    step_flops = per_gpu_step_flops(args.text_len, args.caption_len)
    scenarios = {"paper run, A100 (observed 1.21 s/step)": 1.21}
    for gpu in NODE_CORES:
        scenarios[f"{gpu} at {100 * args.mfu:.0f}% MFU"] = step_flops / (args.mfu * PEAK_FLOPS[gpu])
    rows = []
    for name, step_s in scenarios.items():
        demand = 24 / step_s
        workers = demand / worker
        gpu = "H100" if "H100" in name else "A100"
        rows.append({"scenario": name, "step_s": step_s, "samples_per_s_per_gpu": demand,
                     "workers_per_gpu": workers, "cores_per_8gpu_node": 8 * workers,
                     "node_cores": NODE_CORES[gpu], "headroom": NODE_CORES[gpu] / (8 * workers)})  # fmt: skip
    lines = [
        "# Loader headroom for the giant (24 samples per GPU per step: 8 images, 8 texts, 8 pairs)",
        "",
        f"Command: `python bench/loader_headroom.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
        f"Per-worker throughput measured by `{measured['command']}` on {measured['device']['cpu']} "
        f"({measured['device']['cores']} cores, shared): image {rates['image']:.0f}, "
        f"text {rates['text']:.0f}, "
        f"pair {rates['pair']:.0f} samples/s; one worker producing the 1:1:1 mix: {worker:.1f} samples/s. "
        f"Model FLOPs per GPU step: {step_flops / 1e12:.1f} TFLOP (texts {args.text_len}, captions "
        f"{args.caption_len} tokens).",
        "",
        "| scenario | step s | samples/s per GPU | loader workers per GPU | cores per 8-GPU node "
        "| node cores | headroom |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['scenario']} | {r['step_s']:.3f} | {r['samples_per_s_per_gpu']:.1f} | "
            f"{r['workers_per_gpu']:.2f} | "
            f"{r['cores_per_8gpu_node']:.1f} | {r['node_cores']} | {r['headroom']:.1f}x |"
            for r in rows
        ],  # fmt: skip
        "",
        "Headroom = node cores / cores the loader needs. The visual tokenizer runs on the GPU (not in the "
        "loader); the measuring CPU was shared with other work, so these rates are lower bounds.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "bench/results"
    (out / "loader_headroom.md").write_text(text)
    (out / "loader_headroom.json").write_text(
        json.dumps({"worker_mixed_rate": worker, "rows": rows}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
