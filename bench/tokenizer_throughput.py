"""Tokenizer throughput: SentencePiece text encoding (texts/s per core) and VQ-KD codes/s.

Text: a unigram model trained on CPython's ``pydoc_data.topics`` (real English; ``--spm-vocab`` pieces),
encoding its paragraphs one at a time (``encode``) and in padded batches (``encode_batch``, 1 thread, so the
figure is per core). Visual: ``VisualTokenizer.codes`` on random images for each ``--vqkd`` config (random
weights: throughput does not depend on them), codes/s = images/s x codes per image.

    python bench/tokenizer_throughput.py                     # tiny + base VQ-KD, writes bench/results/
    python bench/tokenizer_throughput.py --vqkd vqkd_tiny_patch16_64 --vqkd-batch 64 --threads 2

Writes ``bench/results/tokenizer_throughput.md`` and ``.json`` with device, versions and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import sentencepiece
import torch

from beit3.tokenizers.text import TextTokenizer, train_sentencepiece
from beit3.tokenizers.vqkd import build_visual_tokenizer, get_vqkd_config

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(fn, min_seconds: float) -> tuple[int, float]:
    """Call ``fn`` until ``min_seconds`` have passed (after one warm-up call); return (calls, seconds)."""
    fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n, elapsed


def bench_text(vocab: int, batch: int, max_len: int, min_seconds: float) -> list[dict]:
    """Rows for single and batched encoding with a model trained on ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    texts = [p.strip() for t in topics.values() for p in t.split("\n\n") if p.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "pydoc.txt"
        corpus.write_text("\n".join(texts), encoding="utf-8")
        t0 = time.perf_counter()
        tok = TextTokenizer(train_sentencepiece([corpus], Path(tmp) / "spm", vocab), num_threads=1)
        train_s = time.perf_counter() - t0
    sample = texts[:batch]
    mean_tokens = sum(len(tok.encode(t)) for t in sample) / len(sample)
    n, s = _timed(lambda: [tok.encode(t) for t in sample], min_seconds)
    single = n * len(sample) / s
    n, s = _timed(lambda: tok.encode_batch(sample, max_len), min_seconds)
    batched = n * len(sample) / s
    common = {
        "pieces": tok.num_pieces,
        "mean_tokens": round(mean_tokens, 1),
        "spm_train_s": round(train_s, 2),
    }
    return [
        {"what": "text encode (one at a time)", "per_s": round(single), "unit": "texts/s/core", **common},
        {"what": f"text encode_batch (B={batch}, L<={max_len})", "per_s": round(batched),
         "unit": "texts/s/core", **common},
    ]  # fmt: skip


def bench_vqkd(name: str, batch: int, min_seconds: float, device: str) -> dict:
    """The row for ``VisualTokenizer.codes`` of config ``name`` on random images."""
    cfg = get_vqkd_config(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights on purpose
        tok = build_visual_tokenizer(name, device=device)
    images = torch.rand(batch, 3, cfg.img_size, cfg.img_size, device=device)

    def run() -> None:
        tok.codes(images)
        if images.is_cuda:
            torch.cuda.synchronize()

    n, s = _timed(run, min_seconds)
    images_per_s = n * batch / s
    per_image = cfg.grid_size**2
    return {
        "what": f"VQ-KD codes {name} (B={batch}, {cfg.img_size}px, {device})",
        "per_s": round(images_per_s * per_image),
        "unit": "codes/s",
        "images_per_s": round(images_per_s, 2),
        "codes_per_image": per_image,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a table, write bench/results/tokenizer_throughput.{md,json}."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spm-vocab", type=int, default=8000)
    p.add_argument("--text-batch", type=int, default=256)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument(
        "--vqkd", nargs="*", default=["vqkd_tiny_patch16_64", "vqkd_encoder_base_decoder_3x768x12_clip"]
    )
    p.add_argument("--vqkd-batch", type=int, default=16)
    p.add_argument("--device", default="cpu", help="where VQ-KD runs (cuda: bf16 autocast)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for VQ-KD (1: a per-core figure)")
    p.add_argument("--min-seconds", type=float, default=3.0, help="time each measurement at least this long")
    p.add_argument("--output", default=str(RESULTS / "tokenizer_throughput"), help="path without extension")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = bench_text(args.spm_vocab, args.text_batch, args.max_len, args.min_seconds)
    rows += [bench_vqkd(name, args.vqkd_batch, args.min_seconds, args.device) for name in args.vqkd]
    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    command = ["python", "bench/tokenizer_throughput.py", *(argv if argv is not None else sys.argv[1:])]
    meta = {
        "command": " ".join(command),
        "device": f"{torch.cuda.get_device_name()} + {cpu}" if torch.cuda.is_available() else cpu,
        # Other work on the machine slows every figure: the 1-minute load average says how busy it was.
        "load_average_1min": round(os.getloadavg()[0], 2),
        "torch_threads": args.threads,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "sentencepiece": sentencepiece.__version__},
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }  # fmt: skip
    lines = ["| measurement | throughput | unit | notes |", "|---|---:|---|---|"]
    for r in rows:
        notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("what", "per_s", "unit"))
        lines.append(f"| {r['what']} | {r['per_s']:,} | {r['unit']} | {notes} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    header = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    out.with_suffix(".md").write_text(f"# Tokenizer throughput\n\n{header}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
