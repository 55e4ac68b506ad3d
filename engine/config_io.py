"""Typed configuration from TOML: dataclasses filled from a file plus ``section.key=value`` overrides.

Shared by the pretraining and finetuning programs. Unknown keys are rejected with the list of known ones, so a
typo in a recipe fails at start-up instead of silently keeping a default for two weeks.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from beit3.engine.errors import EngineError

T = TypeVar("T")


class ConfigError(EngineError, ValueError):
    """A recipe or command-line override that cannot be applied; the message names the fix."""


def read_toml(path: str | Path) -> dict:
    """Parse a TOML file, turning syntax errors into ConfigError with the file name."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not a valid TOML recipe: {e}") from e
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror})") from e


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> (["train", "lr"], 0.001); values are TOML literals, else plain strings."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words (paths, names) need no quotes on the command line
    return key.strip().split("."), value


def dotted_overrides(items: list[str]) -> dict[str, Any]:
    """``["zero_optimization.stage=2"]`` -> ``{"zero_optimization.stage": 2}`` (for ``--ds-set``)."""
    return {".".join(keys): value for keys, value in (parse_override(i) for i in items)}


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (command-line ``--set``) to a copy of a recipe's tables."""
    return set_dotted(data, dotted_overrides(overrides), "table")


def set_dotted(
    data: dict, values: dict, container: str = "table", error: type[Exception] = ConfigError
) -> dict:
    """Set dotted keys (``{"zero_optimization.stage": 3}``) in a copy of nested dicts, the
    one implementation behind recipe and DeepSpeed overrides; a None value removes the key (e.g. to let a
    DeepSpeed batch size be derived again). A key below a non-dict is ``error`` naming the ``container``."""
    data = _deepcopy_dicts(data)
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise error(f"override {dotted!r}: {key!r} is not a {container}")
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return data


def refuse_moved(data: dict, moved: dict[str, str]) -> None:
    """A key a recipe of an earlier version had in another table (``{"train.layer_decay":
    "param_groups.layer_decay"}``) is refused with where it lives now, not as an unknown key."""
    for old, new in moved.items():
        node: Any = data
        for key in old.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            table = new.rsplit(".", 1)[0]
            raise ConfigError(f"{old} is now {new}: move it to the [{table}] table")


def _deepcopy_dicts(d: dict) -> dict:
    return {k: _deepcopy_dicts(v) if isinstance(v, dict) else v for k, v in d.items()}


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into dataclass fields; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"[{where or cls.__name__}] must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in [{where or cls.__name__}]; known keys: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"[{where or cls.__name__}]: {e}") from e


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check/convert one value against a type hint (dataclasses, Optional, list/tuple, float from int)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        fixed = origin is tuple and bool(args) and args[-1] is not Ellipsis
        if fixed and len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({list(value)!r})")
        if fixed:
            return tuple(_coerce(a, v, where) for a, v in zip(args, value))
        item = args[0] if args else Any
        items = [_coerce(item, v, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    is_bool_as_int = tp is int and isinstance(value, bool)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or is_bool_as_int):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dicts (for config.json in the run directory)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclasses.dataclass(frozen=True)
class Range:
    """An interval of allowed values, written like ``"[0, 1)"``, ``"(0, inf)"`` or ``"[1, inf)"``.

    NaN lies in no range, so ``lr = nan`` in a recipe is rejected like any other value out of range.
    """

    low: float
    high: float
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str) -> Range:
        """``"[0, 1)"`` -> Range(0, 1, low_open=False, high_open=True)."""
        text = text.strip()
        low, high = (float(v) for v in text[1:-1].split(","))
        return cls(low, high, text[0] == "(", text[-1] == ")")

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return bool(above and below)

    def __str__(self) -> str:
        if math.isinf(self.high) and not math.isinf(self.low):
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if math.isinf(self.high) and math.isinf(self.low):
            return "finite"
        left, right = "(["[not self.low_open], ")]"[not self.high_open]
        return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


RANGE_KEY = "range"


def bounded(
    default: Any = dataclasses.MISSING, interval: str = "", *, factory: Any = dataclasses.MISSING
) -> Any:
    """A dataclass field with its allowed interval beside it: ``lr: float = bounded(1e-3, "(0, inf)")``
    (``factory`` for a list default). The range is checked by :func:`section_problem`, so a new numeric
    setting is declared, ranged and validated in the one place its dataclass lives."""
    Range.parse(interval)  # a malformed interval fails at import, not at validation
    return dataclasses.field(default=default, default_factory=factory, metadata={RANGE_KEY: interval})


def declared_ranges(cls: type) -> dict[str, str]:
    """``{field: interval}`` of the fields of dataclass ``cls`` declared with :func:`bounded`."""
    return {f.name: f.metadata[RANGE_KEY] for f in dataclasses.fields(cls) if RANGE_KEY in f.metadata}


def section_problem(obj: Any, where: str = "") -> str | None:
    """The first declared range that a dataclass tree violates, naming ``where.section.field``; nested
    dataclass fields are checked as sections of their own (a recipe is checked in one call)."""
    prefix = f"{where}." if where else ""
    problem = range_problem(obj, where or type(obj).__name__, declared_ranges(type(obj)))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if problem is None and dataclasses.is_dataclass(value) and not isinstance(value, type):
            problem = section_problem(value, f"{prefix}{f.name}")
    return problem


def range_problem(section: Any, where: str, rules: dict[str, str]) -> str | None:
    """The first field of dataclass ``section`` outside its range in ``rules`` (name -> ``"[lo, hi)"``),
    as a message naming the setting and the values it accepts; None if all lie in range. Lists and tuples
    are checked element by element; None (an Optional setting left unset) passes."""
    for name, text in rules.items():
        allowed = Range.parse(text)
        value = getattr(section, name)
        if value is None:  # an Optional setting left unset (derived elsewhere): nothing to check
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numbers or any(v not in allowed for v in values):
            shown = list(value) if isinstance(value, (list, tuple)) else value
            each = "each value " if isinstance(value, (list, tuple)) else ""
            return f"{where}.{name}={shown!r} is out of range: {each}must be {allowed}"
    return None


def numeric_fields(cls: type) -> list[str]:
    """Names of the int/float fields (and tuples/lists of them) of dataclass ``cls``: the ones a range
    table must cover."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[float]: the float part
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        args = typing.get_args(tp) if typing.get_origin(tp) in (list, tuple) else (tp,)
        if any(a in (int, float) for a in args):
            out.append(f.name)
    return out
