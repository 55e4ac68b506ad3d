"""The dependency rules between the top-level packages (docs/architecture.md), enforced on the source.

Every ``.py`` file under the mapped folders is parsed (not imported) and each import it makes, including
relative imports, imports inside functions and ``importlib.import_module("...")`` with a literal name, is
checked against the rules:

* ``model`` imports no other ``beit3`` package and no deepspeed (pure torch);
* only ``engine`` imports deepspeed;
* ``engine`` imports none of ``beit3.model``, ``beit3.pretrain``, ``beit3.finetune``, ``beit3.tokenizers``
  (it sees BEiT-3 only through the task protocol);
* ``finetune`` never imports ``beit3.pretrain``; ``pretrain`` never imports ``beit3.finetune``;
* ``tokenizers`` uses ``beit3.model`` at most.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("model", "engine", "pretrain", "finetune", "tokenizers")

# Which beit3 packages each folder may import (itself always allowed).
ALLOWED = {
    "model": set(),
    "engine": set(),
    "tokenizers": {"model"},
    "pretrain": {"model", "engine", "tokenizers"},
    "finetune": {"model", "engine", "tokenizers"},
}
DEEPSPEED_ALLOWED = {"engine"}


def module_name(path: Path) -> str:
    """``beit3.pretrain.data.shards`` for ``pretrain/data/shards.py`` (``__init__`` names the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["beit3", *parts])


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, which is the module ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from beit3 import model`` imports beit3.model: record each imported name under the prefix.
            found += [(node.lineno, f"{prefix}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value))
    return found


def _is_dynamic_import(node: ast.Call) -> bool:
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return name in ("import_module", "__import__") and bool(node.args)


def violations(folder: str, source: str, module: str, is_package: bool = False) -> list[str]:
    """The rule breaks of one source file belonging to ``folder``."""
    out = []
    for line, name in imported_modules(source, module, is_package):
        parts = name.split(".")
        if parts[0] == "deepspeed" and folder not in DEEPSPEED_ALLOWED:
            out.append(f"line {line}: {folder}/ must not import deepspeed (only engine/ does)")
        if parts[0] == "beit3" and len(parts) > 1 and parts[1] in FOLDERS:
            target = parts[1]
            if target != folder and target not in ALLOWED[folder]:
                out.append(f"line {line}: {folder}/ must not import beit3.{target}")
    return out


def _sources() -> list[Path]:
    paths = (p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))
    return sorted(p for p in paths if "__pycache__" not in p.parts)


def test_every_package_file_follows_the_dependency_rules():
    problems = []
    for path in _sources():
        folder = path.relative_to(ROOT).parts[0]
        found = violations(folder, path.read_text(), module_name(path), path.name == "__init__.py")
        problems += [f"{path.relative_to(ROOT)} {v}" for v in found]
    assert not problems, "\n".join(problems)


def test_the_walk_sees_the_model_package():
    names = {module_name(p) for p in _sources()}
    assert {"beit3.model", "beit3.model.beit3", "beit3.model.layers"} <= names


@pytest.mark.parametrize(
    ("folder", "source", "fragment"),
    [
        ("model", "import deepspeed\n", "must not import deepspeed"),
        ("model", "from beit3.engine import trainer\n", "must not import beit3.engine"),
        ("model", "from beit3 import tokenizers\n", "must not import beit3.tokenizers"),
        ("finetune", "def f():\n    from beit3.pretrain.objective import X\n", "beit3.pretrain"),
        ("pretrain", "import beit3.finetune.decoding\n", "beit3.finetune"),
        ("engine", "from beit3.model import build_model\n", "beit3.model"),
        ("engine", "from ..model import build_model\n", "beit3.model"),
        ("tokenizers", "import deepspeed.comm as dist\n", "deepspeed"),
        ("pretrain", "import importlib\nimportlib.import_module('deepspeed')\n", "deepspeed"),
    ],
)
def test_checker_reports_each_kind_of_violation(folder, source, fragment):
    found = violations(folder, source, f"beit3.{folder}.example")
    assert any(fragment in v for v in found), found


@pytest.mark.parametrize(
    ("folder", "source"),
    [
        ("engine", "import deepspeed\nfrom beit3.engine.task import Task\n"),
        ("finetune", "from beit3.model import build_model\nfrom beit3.engine import trainer\n"),
        ("tokenizers", "from beit3.model.layers import DropPath\n"),
        ("model", "from . import layers\nfrom .cache import KVCache\n"),
        ("pretrain", "import tokenizers\n"),  # Hugging Face's package, not ours
    ],
)
def test_checker_accepts_allowed_imports(folder, source):
    assert violations(folder, source, f"beit3.{folder}.example") == []


def test_relative_imports_resolve_against_the_package():
    found = imported_modules("from ...engine import x\nfrom . import y\n", "beit3.pretrain.data", True)
    assert [n for _, n in found] == ["beit3.engine.x", "beit3.pretrain.data.y"]
