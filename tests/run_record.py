"""Checks of what a run directory records: ``config.json`` holds each thing once, markers no recipe."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def subtrees(obj: Any) -> Iterator[Any]:
    """Every node of a JSON tree, the root included."""
    yield obj
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    for child in children:
        yield from subtrees(child)


def keys(obj: Any) -> list[str]:
    """Every key of every mapping in a JSON tree (repeats kept)."""
    return [k for node in subtrees(obj) if isinstance(node, dict) for k in node]


def assert_recorded_once(config: dict) -> None:
    """config.json: the recipe, the command and the resolved model configuration at the top level, what the
    engine ran with under "engine"; the recipe and the DeepSpeed config each exactly once (no copies)."""
    assert {"recipe", "command", "model", "engine"} <= set(config), sorted(config)
    nodes = list(subtrees(config))
    for name, value in (("recipe", config["recipe"]), ("ds_config", config["engine"]["ds_config"])):
        assert sum(node == value for node in nodes) == 1, f"{name} is recorded more than once"
        assert keys(config).count(name) == 1, f"more than one {name!r} key"
    assert "run_info" not in keys(config)
    assert "run_info" not in config["engine"]["trainer"] and config["engine"]["trainer"]["total_steps"] >= 1
    # the recipe's [train] table is recorded once, as run, by the engine
    assert "train" not in config["recipe"] and keys(config).count("total_steps") == 1


def assert_marker_holds_no_recipe(marker: dict, recipe: dict) -> None:
    """A checkpoint marker: what a resume needs (the DeepSpeed config, step, world size, files), no recipe."""
    assert "recipe" not in keys(marker) and "run_info" not in keys(marker), sorted(keys(marker))
    assert not any(node == recipe for node in subtrees(marker))
    assert marker["ds_config"]["train_batch_size"] >= 1 and {"step", "world_size", "files"} <= set(marker)
