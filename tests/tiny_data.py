"""Tiny synthetic shards and a tiny SentencePiece model, for tests and benchmarks of the data pipeline.

Images are random-noise PNG/JPEG files, texts are short sentences over a 20-word vocabulary; sample keys are
``<kind><index>`` so tests can trace every sample back to its shard.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from beit3.pretrain.data.tario import ShardWriter

_VOCAB = "the cat sat on a mat with red blue green dog runs fast slow big small bird sings under tree"
WORDS = tuple(_VOCAB.split())


def encode_image(array: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    """``array`` (H, W[, C]) uint8 -> encoded image bytes."""
    buf = io.BytesIO()
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    img.save(buf, fmt)
    return buf.getvalue()


def noise_image(rng: np.random.Generator, height: int = 64, width: int = 64, fmt: str = "JPEG") -> bytes:
    """A random RGB image, encoded."""
    return encode_image(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), fmt)


def sentence(i: int, min_words: int = 4, max_words: int = 12) -> str:
    """A deterministic sentence of 4-12 words for sample ``i``."""
    n = min_words + i % (max_words - min_words + 1)
    return " ".join(WORDS[(i * 7 + 3 * j) % len(WORDS)] for j in range(n))


def write_tiny_shards(
    out_dir: str,
    kind: str,
    num_samples: int,
    samples_per_shard: int,
    image_size: int = 64,
    seed: int = 0,
) -> list[str]:
    """Write ``num_samples`` samples of ``kind`` ("images", "texts" or "pairs"); returns the shard paths."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(out_dir, kind, max_samples=samples_per_shard)
    for i in range(num_samples):
        fields = {}
        if kind in ("images", "pairs"):
            fields["jpg"] = noise_image(rng, image_size, image_size + (i % 3) * 8)
        if kind in ("texts", "pairs"):
            fields["txt"] = sentence(i).encode()
        writer.write(f"{kind[:-1]}{i:05d}", fields)
    writer.close()
    return [os.path.join(out_dir, s["name"]) for s in writer.shards]


def tiny_tokenizer(out_dir: str, vocab_size: int = 48):
    """A SentencePiece model trained on :func:`sentence` texts (about a second), as a ``TextTokenizer``."""
    from beit3.tokenizers.text import TextTokenizer, train_sentencepiece

    os.makedirs(out_dir, exist_ok=True)
    corpus = os.path.join(out_dir, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(sentence(i) for i in range(400)) + "\n")
    model = train_sentencepiece([corpus], os.path.join(out_dir, "tiny"), vocab_size)
    return TextTokenizer(model)
