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


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the xdist_group marks added here
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (scripts/test.sh: ``-n 2 --dist loadgroup``), the unit a worker takes is one test
    module, so that a module-scoped fixture (a batch of 2-rank runs) is built once; the Slurm tests are one
    unit, so that one localhost cluster runs at a time (each cluster declares every CPU of the machine, and
    the jobs' timeouts assume they start at once). The units that run longest go first (Slurm, then
    modules with a ``slow`` test), so that the workers end together. Without xdist nothing changes."""
    if not config.pluginmanager.hasplugin("xdist"):
        return

    def unit(item) -> str:
        return "slurm" if item.get_closest_marker("slurm") else item.module.__name__

    slow_units = {unit(item) for item in items if item.get_closest_marker("slow")}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(unit(item)))
    rank = {u: i for i, u in enumerate(dict.fromkeys(unit(item) for item in items))}
    items.sort(key=lambda item: (unit(item) != "slurm", unit(item) not in slow_units, rank[unit(item)]))


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
