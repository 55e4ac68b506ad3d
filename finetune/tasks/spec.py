"""The one definition of a finetuning task: :class:`TaskSpec`, declared as ``SPEC`` in its module.

A task's module (``finetune/tasks/<task>.py``) holds its task model (heads, loss) and a ``TaskSpec`` that
says everything the rest of the package needs to know of it: the backbone configuration, how the task
module is built, what a batch carries beyond images and texts, how it is evaluated and what official file
it predicts, the selection metric, the recipe settings it allows and what its data needs. The registry
(:mod:`beit3.finetune.tasks`) holds the specs by name; the builder, the recipe checks, the collator, the
data loading, the evaluation and the CLI read them and name no task themselves (docs/finetune.md,
"Adding a task").

Hooks receive what they work on as arguments: ``build`` a :class:`BuildInputs`, ``collate`` the batch so
far, the examples, the collator and the batch's generator, ``evaluate`` / ``predict`` / ``report`` the
evaluation context of :mod:`beit3.finetune.evaluate` (its sharded loops: ``hits``, ``recalls``,
``captions``, ...), so that a task module imports nothing of the data or evaluation code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from beit3.finetune.tasks.base import OptimSettings

CONFIGURATIONS = ("vision", "language", "fusion", "dual", "seq2seq")  # beit3.finetune.configurations'
SHAPES_LAYOUTS = ("captions", "questions", "pairs")  # how the generated shapes source arranges examples


@dataclass
class BuildInputs:
    """What a task's ``build`` hook gets: the pruned encoder and the recipe's settings."""

    encoder: nn.Module  # build_encoder(model.name, spec.configuration, normalize_output=spec.final_norm)
    recipe: Any  # the FinetuneRecipe
    classes: list[str]  # class / answer names (their count sizes a head unless task.num_classes is set)
    tokenizer: Any  # the TextTokenizer, or None without data.tokenizer
    optim: OptimSettings

    @property
    def num_classes(self) -> int:
        """``task.num_classes``, else the number of class names."""
        return self.recipe.task.num_classes or len(self.classes)


def add_labels(batch: dict, examples: list[dict], collator, generator: torch.Generator | None) -> None:
    """``collate`` hook of the tasks with one class index per example: ``label`` (B,)."""
    batch["label"] = torch.tensor([ex["label"] for ex in examples])


def itself(task: nn.Module) -> nn.Module:
    """``backbone`` of a task module that holds the backbone (``beit3``) itself."""
    return task


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """Everything the finetuning package knows of one task (its name is the recipe's ``task.name``)."""

    name: str
    configuration: str  # the backbone configuration (CONFIGURATIONS)
    final_norm: bool  # the encoder keeps its final LayerNorm (as in the released finetuning models)
    build: Callable[[BuildInputs], nn.Module]  # the task module: heads on the encoder
    selection: tuple[str, str]  # (metric, "max" | "min"): the best checkpoint's, when the recipe sets none
    evaluate: Callable[[Any], dict[str, float]]  # EvalContext -> {"eval/<name>": value}
    predict: Callable[[Any], tuple[object, dict]] | None = None  # EvalContext -> (official output, report)
    report: Callable[[Any], dict] | None = None  # EvalContext -> extra entries of a finished run's eval.json
    collate: Callable[[dict, list[dict], Any, torch.Generator | None], None] | None = None  # adds keys
    backbone: Callable[[nn.Module], nn.Module] = itself  # the module whose .cfg / weights are the backbone's
    images: bool = True  # examples have images (augmentation settings apply)
    texts_in_batch: bool = True  # batches carry the examples' texts (``text``, ``text_padding_mask``)
    needs_tokenizer: bool = True  # the recipe must name data.tokenizer
    mixup: bool = False  # Mixup/CutMix allowed (images with class labels)
    pooling: bool = False  # its heads read task.pooling ("cls" or "mean"; base.pool_tokens)
    sections: tuple[str, ...] = ()  # task-specific recipe tables the task reads (e.g. "captioning")
    batch_step: bool = False  # training batches carry ``step``, the optimizer step they are trained in
    answer_vocabulary: bool = False  # class names from the index's answer2label.txt (VQA)
    references: bool = False  # --predict may score against --references (COCO annotations)
    shapes_layout: str = "captions"  # the generated shapes source's examples for it (SHAPES_LAYOUTS)
    eval_items: str = "images"  # what evaluation counts in its progress lines
    # (recipe, img_size, train_images, classes) -> TaskData: the task reads its own data (dense tasks: a
    # folder layout, an annotation file; beit3.finetune.dense.data) instead of data.source's readers.
    load_data: Callable[[Any, int, bool, list[str] | None], Any] | None = None
    # Trains on the pretraining pair shards, streamed (data.source = "pretrain_pairs",
    # beit3.finetune.data.pair_stream), each optimizer step's micro-batches handed to it as one group.
    pair_stream: bool = False
    # (recipe, model config) -> what the task's settings ask that the model preset cannot do (None: nothing);
    # checked by beit3.finetune.recipe.validate_run, without data.
    recipe_problem: Callable[[Any, Any], str | None] | None = None

    def __post_init__(self) -> None:
        if self.configuration not in CONFIGURATIONS:
            raise ValueError(f"task {self.name!r}: configuration must be one of {CONFIGURATIONS}")
        if self.shapes_layout not in SHAPES_LAYOUTS:
            raise ValueError(f"task {self.name!r}: shapes_layout must be one of {SHAPES_LAYOUTS}")
        if self.selection[1] not in ("max", "min"):
            raise ValueError(f"task {self.name!r}: selection mode must be 'max' or 'min'")
