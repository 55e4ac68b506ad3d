"""The tests' tiny data: synthetic shards and the small SentencePiece models, each built in one place.

Images are random-noise PNG/JPEG files, texts are short sentences over a 20-word vocabulary; sample keys are
``<kind><index>`` so tests can trace every sample back to its shard. :func:`write_pretrain_data` writes the
three kinds and a tokenizer for a real ``beit3-pretrain`` run, :func:`tiny_pretrain_settings` points the demo
recipe at them. The tokenizers: :func:`tiny_tokenizer` (48 pieces over :func:`sentence` texts),
:func:`pydoc_spm` (500 pieces over Python's documentation) and :func:`shapes_spm` (40 pieces over the
generated shapes captions and questions of the finetuning tasks).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

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


def write_pretrain_data(root: str | Path, num_samples: int = 24, samples_per_shard: int = 8) -> dict:
    """Image, text and pair shards under ``root/<kind>`` and a :func:`tiny_tokenizer` under ``root/spm``.

    Returns ``{"root": root, "spm": the model file}`` (see :func:`tiny_pretrain_settings`)."""
    root = Path(root)
    for kind in ("images", "texts", "pairs"):
        write_tiny_shards(str(root / kind), kind, num_samples, samples_per_shard, seed=len(kind))
    return {"root": root, "spm": tiny_tokenizer(str(root / "spm"), vocab_size=48).model_file}


def tiny_pretrain_settings(assets: dict) -> list[str]:
    """``--set`` values (no spaces) that run the demo recipe's tiny model on :func:`write_pretrain_data`."""
    root = assets["root"]
    return [
        f"tokenizers.text={assets['spm']}",
        "tokenizers.visual_checkpoint=",
        *(f'data.{kind[:-1]}_shards=["{root}/{kind}/*.tar"]' for kind in ("images", "texts", "pairs")),
        "model.name=beit3_tiny_patch16_64",
        "model.overrides={vocab_size=64,visual_vocab_size=1024}",
    ]


def set_args(settings: list[str]) -> list[str]:
    """``["--set", s1, "--set", s2, ...]``."""
    return [arg for s in settings for arg in ("--set", s)]


def pydoc_spm(root: str | Path) -> Path:
    """A 500-piece SentencePiece model trained on Python's own documentation text (always installed)."""
    from pydoc_data.topics import topics

    from beit3.tokenizers.text import train_sentencepiece

    root = Path(root)
    corpus = root / "corpus.txt"
    lines = [line.strip() for text in topics.values() for line in text.splitlines() if line.strip()]
    corpus.write_text("\n".join(lines[:20000]))
    return train_sentencepiece([corpus], root / "tiny", vocab_size=500)


def shapes_spm(root: str | Path) -> str:
    """A 40-piece SentencePiece model trained on the shapes captions and questions of the finetuning tasks."""
    from beit3.finetune.data.build import COLORS, QUESTIONS, SHAPES
    from beit3.tokenizers.text import train_sentencepiece

    root = Path(root)
    lines = (
        [f"a {c} {s}." for c in COLORS for s in SHAPES]
        + list(QUESTIONS)
        + [f"a picture of {c}." for c in COLORS]
    )
    (root / "corpus.txt").write_text("\n".join(lines * 10))
    return str(train_sentencepiece([root / "corpus.txt"], root / "shapes", 40))


def shapes_recipe(path: str | Path, spm: str, task_name: str = "vqa", **tables: dict) -> str:
    """A finetuning recipe for the tiny model on generated shapes data (no download) written to ``path``;
    ``tables`` add to or change its tables, e.g. ``train={"total_steps": 30}``. Returns the path."""
    recipe = {
        "task": {"name": task_name},
        "model": {
            "name": "beit3_tiny_patch16_64",
            "drop_path_rate": 0.0,
            "overrides": {"vocab_size": 48, "max_text_positions": 34},
        },
        "data": {
            "source": "shapes",
            "tokenizer": str(spm),
            "max_text_len": 16,
            "max_train": 16,
            "max_eval": 8,
        },
        "train": {"total_steps": 2, "warmup_steps": 1, "lr": 2e-3, "log_every": 1, "save_every": 0},
        "captioning": {"max_len": 8, "num_beams": 2},
    }
    for name, values in tables.items():
        recipe[name] = {**recipe.get(name, {}), **values}

    def literal(value) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k} = {literal(v)}" for k, v in value.items()) + "}"
        return f'"{value}"' if isinstance(value, str) else repr(value)

    lines = [
        f"[{name}]\n" + "\n".join(f"{k} = {literal(v)}" for k, v in values.items())
        for name, values in recipe.items()
    ]
    Path(path).write_text("\n".join(lines) + "\n")
    return str(path)
