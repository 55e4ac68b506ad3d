"""Import names: run from the repository root, ``import tokenizers`` must find Hugging Face's package.

Our ``tokenizers/`` and ``finetune/`` folders are installed as ``beit3.tokenizers`` and ``beit3.finetune``
and carry no ``__init__.py``, so they cannot shadow the PyPI packages of the same names.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("folder", ["tokenizers", "finetune"])
def test_shadowing_folders_have_no_init(folder):
    assert (ROOT / folder).is_dir()
    assert not (ROOT / folder / "__init__.py").exists()


def test_import_tokenizers_from_the_repo_root_is_hugging_faces():
    probe = "import tokenizers; print(tokenizers.__file__); print(tokenizers.Tokenizer.__module__)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (
        "Hugging Face's `tokenizers` (the dev extra: pip install -e '.[dev]') must be importable:\n"
        + result.stderr
    )
    location, module = result.stdout.split()
    assert location != "None" and not Path(location).resolve().is_relative_to(ROOT), location
    assert module.startswith("tokenizers")


def test_our_packages_import_under_the_beit3_namespace():
    probe = "import beit3.model, beit3.tokenizers.text; print(beit3.tokenizers.text.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == (ROOT / "tokenizers" / "text.py").resolve()
