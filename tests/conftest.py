"""Shared fixtures: small real assets built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_data import pydoc_spm, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory) -> Path:
    """A 500-piece SentencePiece model trained on Python's own documentation text (tiny_data.pydoc_spm)."""
    return pydoc_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The 48-piece ``TextTokenizer`` of tiny_data.tiny_tokenizer, for the data pipeline tests."""
    return tiny_tokenizer(str(tmp_path_factory.mktemp("spm")))
