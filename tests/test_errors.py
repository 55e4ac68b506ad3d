"""One error family (issue 12; docs/architecture.md, "Errors").

Every module of the five packages is imported and every exception class it defines is checked:

* it derives from its package's base (``ModelError``, ``EngineError``, ``TokenizersError``,
  ``PretrainError``, ``FinetuneError``), and from ``ValueError`` or ``RuntimeError`` as before, so that
  ``pytest.raises(ValueError)`` and callers' ``except RuntimeError`` keep working;
* no two exception classes of the packages share a name, and only one class is named ``TaskModule`` (the
  engine's protocol), so that a name at a call site says which class it is.

The one exception class outside the family is listed in :data:`OUTSIDE_THE_FAMILY` with the reason.
"""

from __future__ import annotations

import importlib
import inspect
from collections import defaultdict
from pathlib import Path

import pytest

from beit3.engine.errors import EngineError
from beit3.finetune.errors import FinetuneError
from beit3.model.errors import ModelError
from beit3.pretrain.errors import PretrainError
from beit3.tokenizers.errors import TokenizersError

ROOT = Path(__file__).resolve().parents[1]
BASES = {
    "model": ModelError,
    "engine": EngineError,
    "tokenizers": TokenizersError,
    "pretrain": PretrainError,
    "finetune": FinetuneError,
}
# Exception classes that are control flow, not errors: "module.Class" -> why.
OUTSIDE_THE_FAMILY = {
    "beit3.pretrain.data.decode.SkipSample": "the verdict on one sample, caught and counted by the loader",
}


def module_names() -> list[str]:
    """``beit3.<package>.<module>`` of every ``.py`` file under the five folders."""
    names = []
    for folder in BASES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(["beit3", *parts]))
    return names


def defined_classes() -> list[tuple[str, type]]:
    """(package, class) of every class a module of the packages defines (module level and nested)."""
    found, seen = [], set()
    for name in module_names():
        module = importlib.import_module(name)
        stack = [obj for obj in vars(module).values() if inspect.isclass(obj) and obj.__module__ == name]
        while stack:
            cls = stack.pop()
            if cls in seen:
                continue
            seen.add(cls)
            found.append((name.split(".")[1], cls))
            stack += [v for v in vars(cls).values() if inspect.isclass(v) and v.__module__ == name]
    return found


def qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@pytest.fixture(scope="module")
def classes() -> list[tuple[str, type]]:
    return defined_classes()


@pytest.fixture(scope="module")
def exceptions(classes) -> list[tuple[str, type]]:
    return [(package, cls) for package, cls in classes if issubclass(cls, BaseException)]


def test_the_walk_sees_the_errors_of_every_package(exceptions):
    names = {cls.__name__ for _, cls in exceptions}
    assert {base.__name__ for base in BASES.values()} <= names
    assert {"ModelConfigError", "WeightsFileError", "ConfigError", "CheckpointError", "TeacherError"} <= names
    assert {"DataConfigError", "ExportError", "ConfigurationError", "ReloadError", "SkipSample"} <= names
    assert {package for package, _ in exceptions} == set(BASES)


def test_every_exception_derives_from_its_package_base(exceptions):
    problems = []
    for package, cls in exceptions:
        if qualified(cls) in OUTSIDE_THE_FAMILY:
            continue
        if not issubclass(cls, BASES[package]):
            problems.append(f"{qualified(cls)} does not derive from {BASES[package].__name__}")
    assert not problems, "\n".join(problems)


def test_every_specific_error_keeps_its_builtin_kind(exceptions):
    bases = set(BASES.values())
    problems = [
        f"{qualified(cls)} is neither a ValueError nor a RuntimeError"
        for _, cls in exceptions
        if cls not in bases
        and qualified(cls) not in OUTSIDE_THE_FAMILY
        and not issubclass(cls, (ValueError, RuntimeError))
    ]
    assert not problems, "\n".join(problems)


def test_the_bases_are_plain_and_independent():
    for package, base in BASES.items():
        assert base.__bases__ == (Exception,), f"{base.__name__} should derive from Exception only"
        assert base.__module__ == f"beit3.{package}.errors"
    from beit3.engine import EngineError as engine_reexport
    from beit3.model import ModelError as model_reexport

    assert engine_reexport is EngineError and model_reexport is ModelError


def test_the_classes_outside_the_family_exist_and_stay_outside(exceptions):
    by_name = {qualified(cls): cls for _, cls in exceptions}
    for name in OUTSIDE_THE_FAMILY:
        assert name in by_name, f"{name} is listed as outside the family but no longer exists"
        assert not issubclass(by_name[name], tuple(BASES.values())), f"{name} joined the family: unlist it"


def test_no_two_exception_classes_share_a_name(exceptions):
    where = defaultdict(list)
    for _, cls in exceptions:
        where[cls.__name__].append(qualified(cls))
    shared = {name: places for name, places in where.items() if len(places) > 1}
    assert not shared, shared


def test_one_class_is_named_task_module(classes):
    named = [qualified(cls) for _, cls in classes if cls.__name__ == "TaskModule"]
    assert named == ["beit3.engine.task.TaskModule"]


def test_a_multi_package_error_is_caught_by_either_base():
    from beit3.finetune.reload import ReloadError
    from beit3.model import WeightsFileError

    assert issubclass(ReloadError, FinetuneError) and issubclass(ReloadError, WeightsFileError)
    assert issubclass(ReloadError, ModelError)
