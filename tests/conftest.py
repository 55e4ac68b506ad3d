"""Shared fixtures: small real assets built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch.nn.functional as F
from tiny_data import pydoc_spm, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
TORCH_LINEAR = F.linear


@pytest.fixture(autouse=True)
def torch_linear_restored():
    """torch's own ``F.linear`` after every test. An in-process ZeRO-3 engine replaces it process-wide with
    DeepSpeed's ``zero3_linear_wrap`` (``zero_optimization.memory_efficient_linear``, on by default) and never
    puts it back; a later test that counts FLOPs or traces ops would see DeepSpeed's function instead."""
    yield
    F.linear = TORCH_LINEAR


@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory) -> Path:
    """A 500-piece SentencePiece model trained on Python's own documentation text (tiny_data.pydoc_spm)."""
    return pydoc_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The 48-piece ``TextTokenizer`` of tiny_data.tiny_tokenizer, for the data pipeline tests."""
    return tiny_tokenizer(str(tmp_path_factory.mktemp("spm")))
