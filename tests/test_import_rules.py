"""The dependency rules between the top-level packages (docs/architecture.md), enforced on the source.

Every ``.py`` file under the mapped folders is parsed (not imported) and each import it makes, including
relative imports, imports inside functions and ``importlib.import_module("...")`` with a literal name, is
checked against the rules:

* ``model`` imports no other ``beit3`` package and no deepspeed (pure torch);
* only ``engine`` imports deepspeed;
* ``engine`` imports none of ``beit3.model``, ``beit3.pretrain``, ``beit3.finetune``, ``beit3.tokenizers``
  (it sees BEiT-3 only through the task protocol);
* ``finetune`` never imports ``beit3.pretrain`` (one declared exception: ``MODULE_EXCEPTIONS``);
  ``pretrain`` never imports ``beit3.finetune``;
* ``tokenizers`` uses ``beit3.model`` at most;
* no two modules import each other, directly or through others (an import cycle), at module level or
  inside functions.

Each primitive is written once, in the package that owns it (issue 12), also checked on the parsed source:

* special token ids (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, the first ordinary id, ``<mask>``) are
  defined only in ``beit3.tokenizers.text``: no other module binds an int literal to a name such as
  ``BOS_ID``, ``pad_id`` or ``FIRST_PIECE_ID`` (assignments, class fields, argument defaults);
* peak FLOP/s only in ``beit3.engine.metrics``: no other module defines a name with ``peak`` in it bound to a
  literal, or a dict literal keyed by GPU names;
* FLOPs counting only in ``beit3.model.flops``: no other module defines a module-level function or constant
  with ``flops`` in its name (task modules call the owner's functions from their ``batch_stats``);
* no module defines a module-level function with the name of an owner's public primitive (``to_rgb``,
  ``sample_crop``, ``bert_corruption``, ``build_param_groups``, ``lr_at``, ...).
"""

from __future__ import annotations

import ast
import re
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
# The one declared exception (docs/architecture.md): the contrastive stage streams the pretraining pair shards
# with the pretraining loader itself (one owner for reading shards), from this module only, and of
# beit3.pretrain only its data package.
MODULE_EXCEPTIONS = {"beit3.finetune.data.pair_stream": ("beit3.pretrain.data",)}


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
            excepted = any(name == m or name.startswith(m + ".") for m in MODULE_EXCEPTIONS.get(module, ()))
            if target != folder and target not in ALLOWED[folder] and not excepted:
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


def test_the_declared_exception_covers_its_module_and_package_only():
    """pair_stream may import beit3.pretrain.data (and below); nothing else of pretrain; no other module."""
    data = "from beit3.pretrain.data.config import DataConfig\nimport beit3.pretrain.data\n"
    assert violations("finetune", data, "beit3.finetune.data.pair_stream") == []
    assert violations("finetune", "from beit3.pretrain import objective\n", "beit3.finetune.data.pair_stream")
    assert violations("finetune", "import beit3.pretrain.dataset\n", "beit3.finetune.data.pair_stream")
    assert violations("finetune", data, "beit3.finetune.data.sources")


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


# ---- no import cycles --------------------------------------------------------------------------------------


def import_graph(sources: dict[str, tuple[str, bool]]) -> dict[str, set[str]]:
    """Module -> the modules of ``sources`` it imports; ``sources``: module -> (source, is_package).

    ``from beit3.a.b import name`` counts as importing ``beit3.a.b`` (the longest prefix that is a module)."""
    graph = {}
    for module, (source, is_package) in sources.items():
        targets = set()
        for _, name in imported_modules(source, module, is_package):
            parts = name.split(".")
            owner = next(
                (".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in sources),
                None,
            )
            if owner and owner != module:
                targets.add(owner)
        graph[module] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The groups of two or more modules that reach each other through imports (strongly connected)."""
    reach = {m: set() for m in graph}
    for start in graph:
        todo = list(graph[start])
        while todo:
            m = todo.pop()
            if m not in reach[start]:
                reach[start].add(m)
                todo.extend(graph.get(m, ()))
    groups: list[set[str]] = []
    for m in sorted(graph):
        group = {m} | {n for n in reach[m] if m in reach[n]}
        if len(group) > 1 and group not in groups:
            groups.append(group)
    return groups


def test_no_import_cycle_between_modules():
    sources = {module_name(p): (p.read_text(), p.name == "__init__.py") for p in _sources()}
    cycles = import_cycles(import_graph(sources))
    assert not cycles, f"import cycles: {[sorted(c) for c in cycles]}"


def test_cycle_checker_sees_direct_and_indirect_cycles():
    sources = {
        "beit3.pretrain.a": ("from beit3.pretrain.b import f\n", False),
        "beit3.pretrain.b": ("def f():\n    from . import c\n", False),
        "beit3.pretrain.c": ("import beit3.pretrain.a\n", False),
        "beit3.pretrain.d": ("from beit3.pretrain.a import x\n", False),
    }
    graph = import_graph(sources)
    assert graph["beit3.pretrain.b"] == {"beit3.pretrain.c"}
    assert import_cycles(graph) == [{"beit3.pretrain.a", "beit3.pretrain.b", "beit3.pretrain.c"}]


def test_relative_imports_resolve_against_the_package():
    found = imported_modules("from ...engine import x\nfrom . import y\n", "beit3.pretrain.data", True)
    assert [n for _, n in found] == ["beit3.engine.x", "beit3.pretrain.data.y"]


# ---- each primitive once -----------------------------------------------------------------------------------

SPECIAL_IDS_OWNER = "beit3.tokenizers.ids"
PEAK_FLOPS_OWNER = "beit3.engine.metrics"
FLOPS_OWNERS = {"beit3.model.flops", PEAK_FLOPS_OWNER}  # the count, and the device peak it is divided by
# Modules whose public module-level functions are the one implementation of their primitive.
PRIMITIVE_OWNERS = (
    "beit3.model.flops",
    "beit3.model.params",
    "beit3.engine.lr",
    "beit3.engine.metrics",
    "beit3.engine.config_io",
    "beit3.engine.program",
    "beit3.tokenizers.images",
    "beit3.tokenizers.masking",
    "beit3.tokenizers.text",
)
_SPECIAL_ID_NAME = re.compile(
    r"(bos|pad|eos|unk|mask|cls|sep|special|ordinary|piece)\w*_ids?$", re.IGNORECASE
)
_GPU_NAME = re.compile(r"^[ABHLV]\d{2,3}", re.IGNORECASE)  # A100, H100, H200, V100, L40...


def _int_literals(node: ast.AST | None) -> bool:
    """An int literal, or a tuple / list / set of them (``0``, ``(0, 2)``)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, int) and not isinstance(node.value, bool)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(_int_literals(e) for e in node.elts)
    return False


def _literal(node: ast.AST | None) -> bool:
    """A number, or a container literal (the shape of a table)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float)) and not isinstance(node.value, bool)
    return isinstance(node, (ast.Dict, ast.Tuple, ast.List))


def _bound_names(target: ast.AST) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Attribute):
        return [target.attr]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for e in target.elts for n in _bound_names(e)]
    return []


def _bindings(tree: ast.Module):
    """(line, name, value) of every assignment anywhere, annotated class fields and argument defaults."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                values = node.value.elts if isinstance(node.value, ast.Tuple) else None
                names = _bound_names(target)
                if isinstance(target, ast.Tuple) and values is not None and len(values) == len(names):
                    yield from ((node.lineno, n, v) for n, v in zip(names, values))
                else:
                    yield from ((node.lineno, n, node.value) for n in names)
        elif isinstance(node, ast.AnnAssign):
            yield from ((node.lineno, n, node.value) for n in _bound_names(node.target))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            yield from ((node.lineno, a.arg, d) for a, d in pairs)


def _module_level(tree: ast.Module):
    """(line, name, kind) of the module's top-level functions, classes and assigned names."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.lineno, node.name, "function"
        elif isinstance(node, ast.ClassDef):
            yield node.lineno, node.name, "class"
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                yield from ((node.lineno, n, "name") for n in _bound_names(target))


def owned_primitives() -> dict[str, str]:
    """Public module-level function name -> its owner module, over :data:`PRIMITIVE_OWNERS`."""
    out = {}
    for module in PRIMITIVE_OWNERS:
        path = ROOT / Path(*module.split(".")[1:]).with_suffix(".py")
        for _, name, kind in _module_level(ast.parse(path.read_text())):
            if kind == "function" and not name.startswith("_"):
                out[name] = module
    return out


def repetitions(module: str, source: str, primitives: dict[str, str] | None = None) -> list[str]:
    """The places where ``module`` defines a primitive another package owns."""
    tree = ast.parse(source)
    out = []
    if module != SPECIAL_IDS_OWNER:
        for line, name, value in _bindings(tree):
            if _SPECIAL_ID_NAME.search(name) and _int_literals(value):
                out.append(
                    f"line {line}: special token id {name} defined here; import it from {SPECIAL_IDS_OWNER}"
                )
    if module != PEAK_FLOPS_OWNER:
        for line, name, value in _bindings(tree):
            if "peak" in name.lower() and _literal(value):
                out.append(f"line {line}: peak FLOPs {name} defined here; use {PEAK_FLOPS_OWNER}")
        for node in ast.walk(tree):
            keys = [k.value for k in getattr(node, "keys", []) if isinstance(k, ast.Constant)]
            if isinstance(node, ast.Dict) and any(isinstance(k, str) and _GPU_NAME.match(k) for k in keys):
                out.append(
                    f"line {node.lineno}: a table keyed by GPU names; peak FLOPs live in {PEAK_FLOPS_OWNER}"
                )
    for line, name, kind in _module_level(tree):
        if module not in FLOPS_OWNERS and "flops" in name.lower() and kind != "class":
            out.append(f"line {line}: FLOPs counting {name} defined here; use beit3.model.flops")
        owner = (primitives or {}).get(name)
        if kind == "function" and owner and owner != module:
            out.append(f"line {line}: {name} is {owner}'s primitive; import it instead of defining it again")
    return out


def test_only_the_metrics_module_reads_tensorboard_event_files():
    readers = [
        str(path.relative_to(ROOT))
        for path in [*_sources(), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py")]
        if "EventAccumulator" in path.read_text() and path.name != "test_import_rules.py"
    ]
    assert readers == ["engine/metrics.py"], readers


def test_every_primitive_is_defined_once_by_its_owner():
    primitives = owned_primitives()
    problems = []
    for path in _sources():
        found = repetitions(module_name(path), path.read_text(), primitives)
        problems += [f"{path.relative_to(ROOT)} {v}" for v in found]
    assert not problems, "\n".join(problems)


def test_the_owners_define_what_they_own():
    primitives = owned_primitives()
    assert {
        "training_flops",
        "build_param_groups",
        "lr_at",
        "to_rgb",
        "sample_crop",
        "bert_corruption",
    } <= set(primitives)
    text = (ROOT / "tokenizers/ids.py").read_text()
    assert repetitions("beit3.finetune.example", text), "the special-id rule no longer sees the owner's ids"
    metrics = (ROOT / "engine/metrics.py").read_text()
    assert repetitions("beit3.pretrain.example", metrics), (
        "the peak-FLOPs rule no longer sees the owner's table"
    )


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("BOS_ID, EOS_ID = 0, 2\n", "special token id BOS_ID"),
        ("FIRST_PIECE_ID = 4\n", "special token id FIRST_PIECE_ID"),
        ("class C:\n    pad_id: int = 1\n", "special token id pad_id"),
        ("def decode(ids, eos_id=2):\n    pass\n", "special token id eos_id"),
        ("def f(*, mask_id: int = 64001):\n    pass\n", "special token id mask_id"),
        ("self_special_ids = {0, 1, 2, 3}\n", "special token id"),
        ("PEAK = {'A100': 312e12}\n", "peak FLOPs PEAK"),
        ("TABLE = {'H100': 989e12}\n", "keyed by GPU names"),
        ("def device_peak(d):\n    return {'A100': 1.0}.get(d)\n", "keyed by GPU names"),
        ("def step_flops(cfg):\n    return 6.0\n", "FLOPs counting step_flops"),
        ("FLOPS_PER_TOKEN = 6\n", "FLOPs counting FLOPS_PER_TOKEN"),
        ("def to_rgb(img):\n    return img\n", "beit3.tokenizers.images's primitive"),
        ("def build_param_groups(named):\n    return []\n", "beit3.model.params's primitive"),
    ],
)
def test_repetition_checker_reports_each_kind(source, fragment):
    found = repetitions("beit3.finetune.example", source, owned_primitives())
    assert any(fragment in v for v in found), found


@pytest.mark.parametrize(
    "source",
    [
        "from beit3.tokenizers.text import BOS_ID, EOS_ID\nids = [BOS_ID, 5, EOS_ID]\n",
        "def f(tokenizer):\n    pad_id = tokenizer.pad_id\n    return pad_id\n",
        "layer_id = 0\nstream_ids = {'image': 0}\n",
        "from beit3.engine.metrics import PEAK_FLOPS\npeak = PEAK_FLOPS['A100']\n",
        "from beit3.model.flops import training_flops\n"
        "class T:\n    def batch_stats(self, b):\n        return {'flops': training_flops(b)}\n",
        "from beit3.tokenizers.images import to_rgb\n",
    ],
)
def test_repetition_checker_accepts_imports_and_uses(source):
    assert repetitions("beit3.finetune.example", source, owned_primitives()) == []
