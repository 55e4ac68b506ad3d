"""Pretraining loader throughput: samples/s of one worker per stream, and of the whole loader.

Each stream is timed in one process with one torch thread (what a DataLoader worker is): decode, two views of
a random-resized crop (model ``--img-size`` and tokenizer ``--tokenizer-img-size``), flip, colour jitter and
masking, collated into batches of ``--batch``. Then the full loader (``--workers`` processes) on mixed
micro-batches of ``--mix`` images/texts/pairs. Data: ``--data DIR`` with ``images/``, ``texts/``, ``pairs/``
shard folders and a ``corpus.txt`` (e.g. ``beit3-shards demo DIR``), or by default synthetic ImageNet-sized
JPEGs (smooth random content, 500x375) with texts and captions from CPython's pydoc topics.

    python bench/loader_throughput.py [--data DIR] [--seconds 5] [--workers 2]

Writes bench/results/loader_throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import PIL
import torch
from PIL import Image

from beit3.pretrain.data import PretrainDataConfig, build_pretrain_loader
from beit3.pretrain.data.config import expand_shards
from beit3.pretrain.data.loader import BatchProducer
from beit3.pretrain.data.tario import ShardWriter

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375) -> bytes:
    """A JPEG with smooth random structure (low-resolution noise upsampled), of a typical photo's size."""
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def synthetic_data(root: str, num_images: int = 64) -> str:
    """Write images/, texts/, pairs/ shards and corpus.txt under ``root``; returns ``root``."""
    from beit3.pretrain.demo_data import pydoc_paragraphs
    from beit3.pretrain.shards import split_segments

    rng = np.random.default_rng(0)
    paragraphs = pydoc_paragraphs()
    texts = [s for p in paragraphs for s in split_segments(p, 96)]
    captions = [" ".join(p.split()[:12]) for p in paragraphs]
    images = [photo_like(rng) for _ in range(num_images)]
    for kind, n in (("images", num_images), ("texts", len(texts)), ("pairs", num_images)):
        w = ShardWriter(os.path.join(root, kind), kind, max_samples=max(1, n // 4))
        for i in range(n):
            fields = (
                {"txt": (texts[i] if kind == "texts" else captions[i]).encode()} if kind != "images" else {}
            )
            if kind != "texts":
                fields["jpg"] = images[i]
            w.write(f"{i:06d}", fields)
        w.close()
    with open(os.path.join(root, "corpus.txt"), "w") as f:
        f.write("\n".join(texts + captions) + "\n")
    return root


def tokenizer_for(root: str, vocab_size: int):
    from beit3.tokenizers.text import TextTokenizer, train_sentencepiece

    model = train_sentencepiece(
        [os.path.join(root, "corpus.txt")], os.path.join(root, "bench_spm"), vocab_size
    )
    return TextTokenizer(model)


def time_stream(cfg, tok, stream: str, batch: int, seconds: float) -> float:
    """Samples/s of one producer (one worker) making batches of ``batch`` samples of ``stream`` only."""
    shards = {stream: expand_shards(cfg.shards_for(stream))}
    producer = BatchProducer(cfg, tok, {stream: batch}, shards, 0, 1, cfg.seed)
    producer.next_batch()  # fills the shuffle buffer; not timed
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        producer.next_batch()
        n += batch
    return n / (time.perf_counter() - start)


def time_loader(cfg, tok, mix: tuple[int, int, int], seconds: float) -> tuple[float, int]:
    """Mixed samples/s of the full loader with ``cfg.num_workers`` workers (after two warm-up batches)."""
    loader = build_pretrain_loader(cfg, tok, *mix)
    it = iter(loader)
    next(it), next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        n += 1
    elapsed = time.perf_counter() - start
    loader.close()
    return n * sum(mix) / elapsed, n


def device_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()}


def write_report(args, argv, rows: list[tuple[str, float]], mixed: float, batches: int) -> None:
    """Print the table and write ``args.out`` .md and .json with device, versions and command."""
    report = {
        "command": "python "
        + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "device": device_info(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
        },
        "data": args.data or "synthetic 500x375 JPEGs + pydoc texts",
        "img_size": args.img_size,
        "tokenizer_img_size": args.tokenizer_img_size,
        "per_worker_samples_per_s": {s: round(v, 1) for s, v in rows},
        "loader": {
            "workers": args.workers,
            "mix": list(args.mix),
            "samples_per_s": round(mixed, 1),
            "batches": batches,
        },
    }
    lines = [
        "# Pretraining loader throughput",
        "",
        f"`{report['command']}` on {report['device']['cpu']} ({report['device']['cores']} cores); "
        f"torch {torch.__version__}, Pillow {PIL.__version__}; data: {report['data']}; "
        f"{args.img_size} px model view + {args.tokenizer_img_size} px tokenizer view, masking on.",
        "",
        "| stream | samples/s per worker |",
        "|---|---|",
        *[f"| {s} | {v:.1f} |" for s, v in rows],
        f"| loader, {args.workers} workers, mix {'/'.join(map(str, args.mix))} | {mixed:.1f} (all kinds) |",
        "",
    ]
    print("\n".join(lines))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines))
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="folder with images/, texts/, pairs/ and corpus.txt")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--tokenizer-img-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mix", type=int, nargs=3, default=(8, 8, 8), metavar=("IMAGES", "TEXTS", "PAIRS"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--out", default=os.path.join(RESULTS, "loader_throughput"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or synthetic_data(tmp)
        tok = tokenizer_for(tmp if args.data is None else root, args.vocab_size)
        cfg = PretrainDataConfig(
            image_shards=[os.path.join(root, "images")],
            text_shards=[os.path.join(root, "texts")],
            pair_shards=[os.path.join(root, "pairs")],
            img_size=args.img_size,
            patch_size=args.patch_size,
            tokenizer_img_size=args.tokenizer_img_size,
            num_workers=args.workers,
        )
        rows = [(s, time_stream(cfg, tok, s, args.batch, args.seconds)) for s in ("image", "text", "pair")]
        mixed, batches = time_loader(cfg, tok, tuple(args.mix), args.seconds)
    write_report(args, argv, rows, mixed, batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
