"""The finetuning tasks by name: each task's one definition (its :class:`~beit3.finetune.tasks.spec.TaskSpec`,
``SPEC`` in ``finetune/tasks/<task>.py``) registered here, and looked up by every other module.

Adding a task: its module in this folder (task model, hooks, ``SPEC``) and one :func:`register` line
below (docs/finetune.md, "Adding a task"). A task defined elsewhere (a test, a user's package) is
registered the same way, at run time.
"""

from __future__ import annotations

from beit3.finetune.tasks import (
    captioning,
    classification,
    contrastive,
    detection,
    retrieval,
    segmentation,
    vqa,
)
from beit3.finetune.tasks.spec import TaskSpec

_REGISTRY: dict[str, TaskSpec] = {}


def register(spec: TaskSpec, replace: bool = False) -> TaskSpec:
    """Make ``spec`` the task named ``spec.name`` (an error if the name is taken, unless ``replace``)."""
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"task {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove the task ``name`` (tests that register a task of their own)."""
    _REGISTRY.pop(name, None)


def task_names() -> tuple[str, ...]:
    """The registered task names, in registration order."""
    return tuple(_REGISTRY)


def get_task(name: str) -> TaskSpec:
    """The spec of task ``name`` (KeyError naming the registered ones)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}: one of {task_names()}") from None


register(classification.IMAGE_CLASSIFICATION)
register(classification.PROMPT_CLASSIFICATION)
register(classification.TEXT_CLASSIFICATION)
register(vqa.VQA_SPEC)
register(vqa.NLVR2_SPEC)
register(retrieval.SPEC)
register(captioning.SPEC)
register(contrastive.SPEC)
register(segmentation.SPEC)
register(detection.SPEC)
