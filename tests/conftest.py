"""Shared fixtures: small real assets built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory) -> Path:
    """A SentencePiece model trained on Python's own documentation text (always installed)."""
    from pydoc_data.topics import topics

    from beit3.tokenizers.text import train_sentencepiece

    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    lines = [line.strip() for text in topics.values() for line in text.splitlines() if line.strip()]
    corpus.write_text("\n".join(lines[:20000]))
    return train_sentencepiece([corpus], root / "tiny", vocab_size=500)
