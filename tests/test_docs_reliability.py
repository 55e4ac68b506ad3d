"""docs/reliability.md names, for each fault, the test that proves it: every test it names exists."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"


def _named_tests() -> list[tuple[str, str]]:
    """(test file, test function) for every ``tests/x.py::name``, and for every ``::name``, which refers to
    the test file named last before it in the same section."""
    found, current = [], None
    for line in DOC.read_text().splitlines():
        if line.startswith("#"):
            current = None
        for match in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(\w+))?[^`]*`", line):
            path, name = match.group(1), match.group(2)
            current = path or current
            if name and current:
                found.append((current, name))
    return found


def _functions(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


def test_every_test_named_in_the_reliability_page_exists():
    named = _named_tests()
    assert len(named) > 40
    missing = [f"{path}::{name}" for path, name in named if name not in _functions(ROOT / path)]
    assert not missing, missing


def test_every_test_file_named_in_the_reliability_page_exists():
    files = set(re.findall(r"tests/[\w/]+\.py", DOC.read_text()))
    assert files and all((ROOT / f).is_file() for f in files), sorted(
        f for f in files if not (ROOT / f).is_file()
    )
